"""Write any :class:`~t2i.data.base.Source` as webdataset shards.

Each sample becomes ``{key}.jpg`` or ``{key}.png``, ``{key}.txt`` (captions, one a line) and
``{key}.json`` (``key``, ``captions``, ``width``, ``height``, ``source_where``, ``source_key``, and ``links`` --
per caption ``[[entity_id, char_start, char_end], ...]`` -- when entities were linked, see :func:`convert`).
Images already JPEG or PNG are stored as their original bytes (no generation loss; PNG stays
pixel-exact); anything else (webp, bmp, ...) or everything with ``reencode=True`` is stored
as the decoded RGB image re-encoded to JPEG at ``quality``.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import shutil
import tarfile
from pathlib import Path

from PIL import Image
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from t2i.data.base import Source
from t2i.data.skips import DUPLICATE, BadSample, DataError
from t2i.data.wds import INCOMPLETE, incomplete_marker

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

    def write(self, key: str, image: Image.Image, captions: list[str], where: str = "", data=None,
              links: list | None = None) -> str:
        """Add one sample (``data``: its original encoded bytes, if any; ``links``: per caption its entity
        links ``(entity_id, char_start, char_end)``, stored in the json); returns the key used."""
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
        if links is not None:
            meta["links"] = [[[int(v) for v in link] for link in caption] for caption in links]
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


def input_name(source: Source) -> str:
    """What ``source`` reads, for messages: its folder or file, else its input files, else its name."""
    for attr in ("root", "path"):
        if getattr(source, attr, None) is not None:
            return str(getattr(source, attr))
    files = source.inputs()
    if files:
        return str(files[0]) + (f" and {len(files) - 1} more" if len(files) > 1 else "")
    return source.name


def check_output(output) -> Path:
    """``output`` as a Path; a DataError when it names an existing file (shards go in a folder)."""
    out = Path(output).expanduser()
    for p in (out, *out.parents):
        if p.exists() and not p.is_dir():
            raise DataError(f"output={output}: {p} is a file; give a folder for the shards "
                            f"(it is created when missing)")
    return out


def staging_dir(out: Path) -> Path:
    """A private sibling folder the shards are written to before they move into ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.parent / f".{out.name}.converting-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def clean_stale_staging(out: Path) -> list[Path]:
    """Remove the ``.{name}.converting-<pid>`` folders beside ``out`` whose process is gone (a killed run's);
    says so for each. Returns what it removed."""
    removed = []
    for p in sorted(out.parent.glob(f".{glob.escape(out.name)}.converting-*")):
        pid = p.name.rsplit("-", 1)[-1]
        if p.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            print(f"removed {p}: the staging folder of an earlier run (pid {pid}) that did not finish")
            removed.append(p)
    return removed


def move_into(stage: Path, shards: list[Path], out: Path, prefix: str) -> list[Path]:
    """Put the finished ``shards`` (in ``stage``) into ``out``. Into a missing or empty ``out``: one rename of
    the staging folder (nothing between "no shards" and "all shards"). Into a folder that holds other files
    (or the old shards ``overwrite`` replaces): :data:`INCOMPLETE` is written first and removed last, so a kill
    midway leaves a folder every reader refuses."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        os.rename(stage, out)  # rename(2) replaces an empty folder
        return [out / p.name for p in shards]
    mark = incomplete_marker(out)
    mark.write_text(f"t2i-data convert pid {os.getpid()} is moving {len(shards)} shard(s) in\n", encoding="utf-8")
    for p in existing_shards(out, prefix):  # overwrite: the old shards go once the new ones are whole
        p.unlink()
    moved = []
    for p in shards:
        moved.append(out / p.name)
        os.replace(p, moved[-1])  # a rename on one file system: the staging folder is a sibling
    mark.unlink()
    return moved


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
    lexicon=None,
    max_entities: int = 10,
) -> dict:
    """Write every good sample of ``source`` to shards in ``output``; bad ones are counted in ``source.log``.

    The shards are written to a temporary sibling folder (``.{name}.converting-{pid}``) and moved
    into ``output`` only when the run succeeds (:func:`move_into`: one rename into a new or empty folder,
    else under a marker every reader refuses until a rerun completes); staging folders of killed runs
    (their pid gone) are removed first, with a line saying so. A run that fails - too many bad rows (past
    ``max_bad_fraction``, default the source log's own), no sample at all, an interrupt - leaves
    ``output`` as it was and the temporary folder removed. A repeated id (the same source key
    twice) keeps its first sample; the others are skipped as ``duplicate`` with their location.
    Refuses to mix with ``{prefix}-*.tar`` shards already in ``output`` unless ``overwrite`` (which
    replaces them once the new ones are complete), always refuses to write over the shards
    ``source`` reads from, and refuses an ``output`` that is a file.
    ``lexicon`` (an :class:`~t2i.knowledge.EntityLexicon`) links every caption (at most ``max_entities``
    entities each) and stores the links in the sample json; without it, links a reader carries (the EasyNLP
    knowledge TSV) are stored as they are.
    Returns {"written", "skipped": {reason: n}, "shards": [paths], "log"}.
    """
    out = check_output(output)
    check_not_input(source, out, prefix)
    clean_stale_staging(out)
    old = existing_shards(out, prefix)
    if incomplete_marker(out).is_file() and not overwrite:
        raise DataError(f"output={output} holds an incomplete set of shards (a killed convert; "
                        f"{INCOMPLETE} marks it): pass overwrite=true to replace them")
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
    if not records and not log.n_bad:
        raise DataError(f"{source.key}={input_name(source)}: no samples found for source={source.name}; "
                        f"check the path and the source reader (nothing was written)")
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[bad]} bad"),
        TimeRemainingColumn(),
    ]
    stage = staging_dir(out)
    shutil.rmtree(stage, ignore_errors=True)
    seen: set[str] = set()
    try:
        with (
            ShardWriter(stage, prefix, shard_size, quality, reencode) as writer,
            Progress(*columns, disable=not progress) as bar,
        ):
            task = bar.add_task(escape(f"{source.name} -> {output}"), total=len(records), bad=log.n_bad)
            for rec in records:
                if rec.key in seen:
                    log.skip(DUPLICATE, rec.where)
                else:
                    try:
                        data, image = source.load_sample(rec)
                    except BadSample as e:
                        log.skip(e.reason, e.where)
                    else:
                        links = (lexicon.link_many(rec.captions, max_entities) if lexicon is not None
                                 else rec.links)
                        writer.write(rec.key, image, rec.captions, rec.where, data, links=links)
                        seen.add(rec.key)
                        log.ok()
                bar.update(task, advance=1, bad=log.n_bad)
        print(log.summary())
        log.check()
        if writer.count == 0:
            raise DataError(f"{source.key}={input_name(source)}: all {log.n_bad} samples were skipped "
                            f"(see the summary above); nothing was written")
        shards = move_into(stage, writer.shards, out, prefix)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    print(f"wrote {writer.count} samples to {len(shards)} shard(s) in {output}")
    return {
        "written": writer.count,
        "skipped": dict(log.by_reason),
        "shards": [str(p) for p in shards],
        "log": log,
    }
