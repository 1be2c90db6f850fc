"""Write any :class:`~t2i.data.base.Source` as webdataset shards.

Each sample becomes ``{key}.jpg`` or ``{key}.png``, ``{key}.txt`` (captions, one a line) and
``{key}.json`` (``key``, ``captions``, ``width``, ``height``, ``source_where``, ``source_key``).
Images already JPEG or PNG are stored as their original bytes (no generation loss; PNG stays
pixel-exact); anything else (webp, bmp, ...) or everything with ``reencode=True`` is stored
as the decoded RGB image re-encoded to JPEG at ``quality``.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

from PIL import Image
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from t2i.data.base import Source
from t2i.data.skips import BadSample, DataError

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SHARD_MTIME = 1_700_000_000  # fixed member time so the same input gives byte-identical shards


def sanitize_key(key: str) -> str:
    """Webdataset keys end at the first dot and must not make folders: '.', '/', '\\\\' -> '_'."""
    return re.sub(r"[./\\]", "_", str(key)) or "_"


def image_payload(data: bytes | None, image: Image.Image, quality: int = 95, reencode: bool = False):
    """(extension, bytes) to store: the original bytes when JPEG/PNG, else a JPEG of ``image``."""
    if data is not None and not reencode:
        if data.startswith(JPEG_MAGIC):
            return "jpg", data
        if data.startswith(PNG_MAGIC):
            return "png", data
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return "jpg", buf.getvalue()


class ShardWriter:
    """Writes ``output/{prefix}-000000.tar``, ... with ``shard_size`` samples each.

    A shard is written as ``.tar.tmp`` and renamed when complete. Keys are sanitised; a key
    that collides with an earlier one gets ``_1``, ``_2``, ... appended.
    """

    def __init__(
        self, output, prefix: str = "shard", shard_size: int = 1000, quality: int = 95, reencode=False
    ):
        if shard_size < 1:
            raise DataError(f"shard_size={shard_size}: must be >= 1")
        self.output = Path(output)
        self.output.mkdir(parents=True, exist_ok=True)
        self.prefix, self.shard_size, self.quality, self.reencode = prefix, shard_size, quality, reencode
        self.shards: list[Path] = []
        self.count = 0
        self._tar: tarfile.TarFile | None = None
        self._in_shard = 0
        self._keys: set[str] = set()

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), SHARD_MTIME, 0o644
        self._tar.addfile(info, io.BytesIO(data))

    def _finish_shard(self) -> None:
        if self._tar is not None:
            self._tar.close()
            tmp = self.shards[-1].with_name(self.shards[-1].name + ".tmp")
            tmp.replace(self.shards[-1])
            self._tar, self._in_shard = None, 0

    def write(self, key: str, image: Image.Image, captions: list[str], where: str = "", data=None) -> str:
        """Add one sample (``data``: its original encoded bytes, if any); returns the key used."""
        if self._tar is None or self._in_shard >= self.shard_size:
            self._finish_shard()
            path = self.output / f"{self.prefix}-{len(self.shards):06d}.tar"
            self.shards.append(path)
            self._tar = tarfile.open(path.with_name(path.name + ".tmp"), "w", format=tarfile.PAX_FORMAT)
        base = name = sanitize_key(key)
        n = 0
        while name in self._keys:
            n += 1
            name = f"{base}_{n}"
        self._keys.add(name)
        ext, payload = image_payload(data, image, self.quality, self.reencode)
        meta = {
            "key": name,
            "captions": list(captions),
            "width": image.width,
            "height": image.height,
            "source_where": where,
            "source_key": key,
        }
        self._add(f"{name}.{ext}", payload)
        self._add(f"{name}.txt", "\n".join(captions).encode("utf-8"))
        self._add(f"{name}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))
        self._in_shard += 1
        self.count += 1
        return name

    def close(self) -> None:
        self._finish_shard()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _shard_name(prefix: str) -> re.Pattern:
    return re.compile(rf"{re.escape(prefix)}-\d{{6}}\.tar(\.tmp)?")


def existing_shards(output, prefix: str = "shard") -> list[Path]:
    """Shards named like ours already in ``output``."""
    out = Path(output)
    pattern = _shard_name(prefix)
    return sorted(p for p in out.glob(f"{prefix}-*") if pattern.fullmatch(p.name)) if out.is_dir() else []


def check_not_input(source: Source, output, prefix: str = "shard") -> None:
    """Raise DataError if ``source`` reads a file that writing ``{prefix}-NNNNNN.tar`` shards to
    ``output`` would delete or overwrite (re-sharding a folder in place)."""
    out = Path(output).expanduser()
    if not out.is_dir():
        return
    out, pattern = out.resolve(), _shard_name(prefix)
    hit = [p for p in source.inputs() if pattern.fullmatch(Path(p).name) and Path(p).resolve().parent == out]
    if hit:
        more = f" and {len(hit) - 1} more" if len(hit) > 1 else ""
        raise DataError(
            f"output={output} holds the input shards ({hit[0]}{more}) that writing {prefix}-*.tar there "
            f"would replace; write to another folder"
        )


def convert(
    source: Source,
    output: str | Path,
    shard_size: int = 1000,
    prefix: str = "shard",
    progress: bool = True,
    max_bad_fraction: float | None = None,
    quality: int = 95,
    reencode: bool = False,
    overwrite: bool = False,
) -> dict:
    """Write every good sample of ``source`` to shards in ``output``; bad ones are counted in ``source.log``.

    Prints the skip summary, then raises DataError (after the shards are complete) if the bad
    fraction passes ``max_bad_fraction`` (default: the source log's own). Refuses to mix with
    ``{prefix}-*.tar`` shards already in ``output`` unless ``overwrite`` (which deletes them), and
    always refuses to write over the shards ``source`` reads from.
    Returns {"written", "skipped": {reason: n}, "shards": [paths], "log"}.
    """
    check_not_input(source, output, prefix)
    old = existing_shards(output, prefix)
    if old and not overwrite:
        raise DataError(
            f"output={output} already holds {len(old)} shard(s) named {prefix}-*.tar; "
            f"choose another output or prefix, or pass overwrite=True to replace them"
        )
    log = source.log
    log.reset()
    if max_bad_fraction is not None:
        log.max_bad_fraction = float(max_bad_fraction)
    records = source.records(log)
    for p in old:
        p.unlink()
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[bad]} bad"),
        TimeRemainingColumn(),
    ]
    with (
        ShardWriter(output, prefix, shard_size, quality, reencode) as writer,
        Progress(*columns, disable=not progress) as bar,
    ):
        task = bar.add_task(escape(f"{source.name} -> {output}"), total=len(records), bad=log.n_bad)
        for rec in records:
            try:
                data, image = source.load_sample(rec)
            except BadSample as e:
                log.skip(e.reason, e.where)
            else:
                writer.write(rec.key, image, rec.captions, rec.where, data)
                log.ok()
            bar.update(task, advance=1, bad=log.n_bad)
    print(log.summary())
    print(f"wrote {writer.count} samples to {len(writer.shards)} shard(s) in {output}")
    summary = {
        "written": writer.count,
        "skipped": dict(log.by_reason),
        "shards": [str(p) for p in writer.shards],
        "log": log,
    }
    log.check()
    return summary
