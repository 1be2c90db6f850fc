"""Code shards: a dataset's images as image-token grids, written by ``t2i-tokenize``, read by stage 2.

An output folder holds, per split and rank, webdataset tar shards
``codes-{split}-{rank:02d}-{index:06d}.tar`` with three members per image:

- ``{key}.codes.npy``: the ``[h, w]`` code grid, int16 when ``codebook_size <= 32767`` else int32;
- ``{key}.txt``: every caption of the image, one a line;
- ``{key}.json``: ``{"key", "captions", "source_where"}`` (``key`` is the record's own id; the
  member name is the id made tar-safe, see :func:`t2i.data.shards.sanitize_key`).

Sharding is deterministic, which is what makes a run resumable: rank ``r`` of ``W`` encodes the
split's records ``r::W`` (in the reader's order) and its shard ``i`` holds positions
``[i * shard_size, (i + 1) * shard_size)`` of that list (fewer samples when images were bad). A
shard is written as ``.tar.tmp`` and renamed when closed, so a final ``.tar`` is always whole.

Each rank keeps its state in ``manifest.rank{r}.json`` (rewritten after every shard: the shards it
finished, their counts and skipped samples). ``manifest.json`` is merged from the rank files
(:func:`merge_manifests`) whenever every rank of a split has finished it - by the last rank to
finish, or under ``torchrun`` by rank 0 after a barrier. It holds::

    {"version": 1, "count": {split: n}, "shards": {split: [file names]}, "grid": [h, w],
     "codebook_size", "downsample", "image_size", "dtype", "tokenizer_ckpt", "tokenizer_sha256",
     "tokenizer_kind", "image_tokenizer": {"kind", "files", "sha256", "relative"},
     "text_tokenizer": "text_tokenizer.json", "text_tokenizer_source": {"path", "relative"},
     "data": <resolved data config>, "splits": {split: {"world_size", "shard_size", "records",
     "skipped": {reason: n}}}}

The folder is self-describing wherever it is moved: ``image_tokenizer`` (a spec for
:func:`t2i.pretrained.load_tokenizer`) records every file of the image tokenizer with its sha256, its
absolute path and its path relative to the folder (tried when the absolute one is gone);
``text_tokenizer`` is a copy of the data config's text tokenizer beside the manifest (when it existed
at tokenize time; ``text_tokenizer_source`` otherwise names it absolutely and relatively).
:func:`text_tokenizer_path` and :func:`image_tokenizer_spec` resolve both.

Readers: :class:`CodeShards` (iterate ``(key, codes, captions)``), :func:`load_codes` (a whole split
in memory), :func:`read_manifest` and :func:`check_manifest` (does the transformer config fit?).
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from t2i.data.shards import SHARD_MTIME, sanitize_key
from t2i.data.skips import DataError
from t2i.data.specs import file_sha256  # noqa: F401 (re-exported: t2i-tokenize, metrics and eval import it from here)

VERSION = 1
MANIFEST = "manifest.json"
INT16_MAX = 32767
SHARD_RE = re.compile(r"codes-(?P<split>.+)-(?P<rank>\d{2,})-(?P<index>\d{6})\.tar(?:\.tmp)?")
RANK_FILE_RE = re.compile(r"manifest\.rank(?P<rank>\d+)\.json")
# what every rank file and the manifest of one output folder must agree on
HEADER_KEYS = ("tokenizer_sha256", "grid", "codebook_size", "downsample", "image_size", "dtype")


def code_dtype(codebook_size: int) -> str:
    """The smallest signed integer type that holds every code: 'int16' or 'int32'."""
    return "int16" if int(codebook_size) <= INT16_MAX else "int32"


def shard_name(split: str, rank: int, index: int) -> str:
    return f"codes-{split}-{rank:02d}-{index:06d}.tar"


def rank_file(output, rank: int) -> Path:
    return Path(output) / f"manifest.rank{rank}.json"


def write_json(path: Path, obj: dict) -> None:
    """Write ``obj`` atomically (a private temp file renamed over ``path``)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=1), encoding="utf-8")
    tmp.replace(path)


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path} cannot be read ({type(e).__name__}: {e}); delete it or pass overwrite=true") from None


def rank_files(output) -> dict[int, Path]:
    out = Path(output)
    if not out.is_dir():
        return {}
    found = {}
    for p in out.iterdir():
        m = RANK_FILE_RE.fullmatch(p.name)
        if m:
            found[int(m["rank"])] = p
    return dict(sorted(found.items()))


def code_files(output) -> list[Path]:
    """Every code shard (finished or ``.tmp``) in ``output``."""
    out = Path(output)
    return sorted(p for p in out.iterdir() if SHARD_RE.fullmatch(p.name)) if out.is_dir() else []


# -- writing ------------------------------------------------------------------------------------


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


class CodeShardWriter:
    """One code shard: :meth:`write` samples, then :meth:`close` renames ``.tar.tmp`` to ``.tar``."""

    def __init__(self, path, dtype: str):
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self._tar = tarfile.open(self.tmp, "w", format=tarfile.PAX_FORMAT)
        self._names: set[str] = set()
        self.count = 0

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), SHARD_MTIME, 0o644
        self._tar.addfile(info, io.BytesIO(data))

    def write(self, key: str, codes, captions: list[str], where: str = "", links: list | None = None) -> str:
        """Add one image's code grid ``[h, w]`` and captions (and, when the record carries them, its
        captions' entity links, kept in the json); returns the member name used."""
        base = name = sanitize_key(key)
        n = 0
        while name in self._names:  # two ids that sanitise alike
            n += 1
            name = f"{base}_{n}"
        self._names.add(name)
        arr = np.ascontiguousarray(np.asarray(codes).astype(self.dtype, copy=False))
        self._add(f"{name}.codes.npy", npy_bytes(arr))
        self._add(f"{name}.txt", "\n".join(captions).encode("utf-8"))
        meta = {"key": key, "captions": list(captions), "source_where": where}
        if links is not None:
            meta["links"] = [[[int(v) for v in link] for link in caption] for caption in links]
        self._add(f"{name}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))
        self.count += 1
        return name

    def close(self) -> Path:
        self._tar.close()
        self.tmp.replace(self.path)
        return self.path

    def abort(self) -> None:
        self._tar.close()
        self.tmp.unlink(missing_ok=True)


# -- manifests ----------------------------------------------------------------------------------


def describe(header: dict) -> str:
    h, w = header["grid"]
    return (f"a {h}x{w} grid of {header['codebook_size']} codes at {header['image_size']} px from "
            f"{header.get('tokenizer_ckpt')} (sha256 {str(header.get('tokenizer_sha256'))[:12]})")


def merge_manifests(output) -> dict | None:
    """(Re)build ``output/manifest.json`` from the rank files; returns it, or None when no split is
    finished by all of its ranks yet. A split is in the manifest when ranks ``0..W-1`` (``W`` the
    world size it was written with) all report it complete with the same world and shard size."""
    out = Path(output)
    states = {r: read_json(p) for r, p in rank_files(out).items()}
    if not states:
        return None
    first = states[min(states)]
    for r, st in states.items():
        bad = [k for k in HEADER_KEYS if st.get(k) != first.get(k)]
        if bad:
            raise DataError(f"{rank_file(out, r)} disagrees with {rank_file(out, min(states))} on {', '.join(bad)}: "
                            f"the ranks used different tokenizers or settings; re-run with overwrite=true")
    splits: dict[str, dict] = {}
    order = {"train": 0, "val": 1, "test": 2}
    all_splits = sorted({s for st in states.values() for s in st.get("splits", {})}, key=lambda s: (order.get(s, 3), s))
    for split in all_splits:
        entries = [st["splits"].get(split) for st in states.values()]
        world = next(e["world_size"] for e in entries if e)
        parts = [states.get(r, {}).get("splits", {}).get(split) for r in range(world)]
        if any(p is None or not p.get("complete") or p["world_size"] != world
               or p["shard_size"] != parts[0]["shard_size"] or p["records"] != parts[0]["records"] for p in parts):
            continue
        skipped: dict[str, int] = {}
        for p in parts:
            for info in p["shards"].values():
                for reason, n in info["skipped"]["by_reason"].items():
                    skipped[reason] = skipped.get(reason, 0) + n
        splits[split] = {
            "count": sum(info["count"] for p in parts for info in p["shards"].values()),
            "shards": sorted(name for p in parts for name in p["shards"]),
            "world_size": world,
            "shard_size": parts[0]["shard_size"],
            "records": parts[0]["records"],
            "skipped": skipped,
        }
    if not splits:
        (out / MANIFEST).unlink(missing_ok=True)  # a split being rewritten is not readable yet
        return None
    manifest = {"version": VERSION, "count": {s: v["count"] for s, v in splits.items()},
                "shards": {s: v["shards"] for s, v in splits.items()}}
    for k in (*HEADER_KEYS, "tokenizer_ckpt", "tokenizer_kind", "image_tokenizer", "text_tokenizer",
              "text_tokenizer_source", "data"):
        if k in first:
            manifest[k] = first[k]
    manifest["splits"] = {s: {k: v for k, v in d.items() if k not in ("count", "shards")} for s, d in splits.items()}
    write_json(out / MANIFEST, manifest)
    return manifest


def read_manifest(output) -> dict:
    """``output/manifest.json`` (merged from the rank files first if they are newer), with ``"path"``:
    the folder it was read from. Raises one clear :class:`DataError` when there is none."""
    out = Path(str(output)).expanduser()
    if not out.is_dir():
        raise DataError(f"code shards {output}: no such folder (run `t2i-tokenize output={output} ...` first)")
    path = out / MANIFEST
    ranks = rank_files(out)
    if ranks and (not path.exists() or max(p.stat().st_mtime for p in ranks.values()) > path.stat().st_mtime):
        try:
            merge_manifests(out)
        except OSError:  # a read-only copy: use the manifest as it is
            pass
    if not path.exists():
        have = f"; rank files present: {', '.join(map(str, ranks))}" if ranks else ""
        raise DataError(f"code shards {output}: no {MANIFEST} - t2i-tokenize writes it once every rank has "
                        f"finished a split{have}; run (or resume) `t2i-tokenize output={output} ...`")
    manifest = read_json(path)
    if manifest.get("version") != VERSION:
        raise DataError(f"{path}: manifest version {manifest.get('version')} is not {VERSION}; re-tokenize")
    manifest["path"] = str(out)
    return manifest


def text_tokenizer_path(manifest: dict, override=None, key: str = "data.tokenizer") -> str:
    """The text tokenizer of a manifest (from :func:`read_manifest`): ``override`` if given, else the copy
    beside the manifest, else the data config's file (its absolute path, its path relative to the code
    folder, or - old manifests - the path as written). One :class:`DataError` naming ``key`` otherwise."""
    if override:
        return str(override)
    folder = Path(manifest.get("path", "."))
    if manifest.get("text_tokenizer") and (folder / manifest["text_tokenizer"]).is_file():
        return str(folder / manifest["text_tokenizer"])
    source = manifest.get("text_tokenizer_source") or {}
    written = (manifest.get("data") or {}).get("tokenizer")
    tried = [Path(source["path"])] if source.get("path") else []
    tried += [folder / source["relative"]] if source.get("relative") else []
    if not source and written:
        tried += [Path(str(written)).expanduser(), folder / str(written)]
    if not tried:
        raise DataError(f"code shards {folder} do not name a text tokenizer; set {key}=<tokenizer.json>")
    hit = next((p for p in tried if p.exists()), None)
    if hit is None:
        raise DataError(f"code shards {folder}: their text tokenizer {tried[0]} no longer exists (nor "
                        f"{', '.join(map(str, tried[1:])) or 'a copy beside the manifest'}); set "
                        f"{key}=<tokenizer.json>")
    return str(hit)


def image_tokenizer_spec(manifest: dict) -> dict:
    """The manifest's image tokenizer as a :func:`t2i.pretrained.load_tokenizer` spec (old manifests: built
    from ``tokenizer_ckpt`` / ``tokenizer_sha256``); resolve it with ``t2i.data.specs.resolve_spec(spec,
    base=manifest["path"])``."""
    spec = manifest.get("image_tokenizer")
    if spec:
        return dict(spec)
    if not manifest.get("tokenizer_ckpt"):
        raise DataError(f"code shards {manifest.get('path')}: the manifest names no image tokenizer; set "
                        "model.image_tokenizer=<tokenizer .ckpt>")
    return {"kind": manifest.get("tokenizer_kind") or "t2i", "files": {"ckpt": manifest["tokenizer_ckpt"]},
            "sha256": {"ckpt": manifest.get("tokenizer_sha256")}}


def check_manifest(manifest: dict, grid, codebook_size: int, grid_key: str = "model.image_grid",
                   codebook_key: str = "model.codebook_size") -> None:
    """Raise one :class:`DataError` when code shards and a transformer config disagree on the grid
    (an int for a square grid, or ``(h, w)``) or the codebook size."""
    want = [int(grid), int(grid)] if isinstance(grid, int) else [int(g) for g in grid]
    have, have_k = [int(g) for g in manifest["grid"]], int(manifest["codebook_size"])
    if want == have and int(codebook_size) == have_k:
        return
    where = manifest.get("path", "the code shards")
    fix_grid = str(have[0]) if have[0] == have[1] else f"[{have[0]},{have[1]}]"
    raise DataError(
        f"code shards in {where} have a {have[0]}x{have[1]} grid of {have_k} codes; the transformer is "
        f"configured for {want[0]}x{want[1]} / {int(codebook_size)}: set {grid_key}={fix_grid} "
        f"{codebook_key}={have_k} or re-tokenize with the matching image tokenizer"
    )


# -- reading ------------------------------------------------------------------------------------


def _samples(path: Path):
    """(member name, {ext: bytes}) per sample of one code shard, in order."""
    current, parts = None, {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                name, _, ext = base.partition(".")
                if name != current:
                    if current is not None:
                        yield current, parts
                    current, parts = name, {}
                parts[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"code shard {path} cannot be read ({type(e).__name__}: {e}); re-tokenize it "
                        f"(delete it and resume t2i-tokenize)") from None
    if current is not None:
        yield current, parts


class CodeShards(IterableDataset):
    """``(key, codes LongTensor[h, w], captions list[str])`` for every image of some code shards.

    ``source``: an output folder of ``t2i-tokenize`` (then ``split`` picks the shards listed in its
    manifest, and every grid is checked against it), or tar paths / a glob / brace pattern. Inside
    DataLoader workers each worker reads its share of the shards; ``rank``/``world_size`` deal the
    shards to DDP ranks first.
    """

    def __init__(self, source, split: str | None = None, rank: int = 0, world_size: int = 1):
        self.manifest = None
        p = Path(str(source)).expanduser() if isinstance(source, (str, Path)) else None
        if p is not None and p.is_dir() and ((p / MANIFEST).exists() or rank_files(p)):
            self.manifest = read_manifest(p)
            if split is None or split not in self.manifest["shards"]:
                have = ", ".join(self.manifest["shards"]) or "none"
                raise DataError(f"code shards in {p} have no {split!r} split (have: {have}); "
                                f"run `t2i-tokenize split={split} output={p} ...`")
            self.urls = [p / name for name in self.manifest["shards"][split]]
            missing = [u for u in self.urls if not u.exists()]
            if missing:
                raise DataError(f"code shard {missing[0]} is listed in {p / MANIFEST} but missing "
                                f"({len(missing)} missing); resume t2i-tokenize to rewrite it")
        else:
            from t2i.data.wds import expand_urls

            self.urls = expand_urls(source, key="code shards")
        self.split, self.rank, self.world_size = split, rank, world_size

    def __len__(self) -> int:
        if self.manifest is None or self.world_size != 1:
            raise TypeError("len() needs a tokenize output folder read whole (rank 0 of 1)")
        return int(self.manifest["count"][self.split])

    def my_urls(self) -> list[Path]:
        urls = self.urls[self.rank :: self.world_size]
        info = get_worker_info()
        return urls[info.id :: info.num_workers] if info is not None else urls

    def __iter__(self):
        for key, codes, captions in self.arrays():
            yield key, torch.from_numpy(codes.astype(np.int64)), captions

    def arrays(self, with_links: bool = False):
        """Like iterating, but each grid is the stored numpy array (int16, or int32 for codebooks over
        32767 codes) - no int64 copy; :func:`load_codes` reads through this. ``with_links``: yield a 4th item,
        the captions' stored entity links (None when the json has none)."""
        grid = self.manifest["grid"] if self.manifest else None
        for url in self.my_urls():
            for name, parts in _samples(url):
                if "codes.npy" not in parts:
                    raise DataError(f"code shard {url}: sample {name} has no codes.npy; re-tokenize it")
                codes = np.load(io.BytesIO(parts["codes.npy"]), allow_pickle=False)
                if grid is not None and list(codes.shape) != list(grid):
                    raise DataError(f"code shard {url}: sample {name} has a {list(codes.shape)} grid, the "
                                    f"manifest says {grid}; re-tokenize")
                meta = json.loads(parts["json"]) if "json" in parts else None
                if meta is not None:
                    key, captions = meta["key"], meta["captions"]
                else:
                    key, captions = name, [c for c in parts.get("txt", b"").decode("utf-8").split("\n") if c]
                if not with_links:
                    yield key, codes, captions
                    continue
                links = (meta or {}).get("links")
                if not isinstance(links, list) or len(links) != len(captions):
                    links = None
                yield key, codes, captions, links


def load_codes(source, split: str | None = None, dtype: torch.dtype | None = torch.long,
               links: list | None = None) -> tuple[list[str], torch.Tensor, list[list[str]]]:
    """A whole split in memory: (keys, codes ``[N, h, w]``, captions per image).

    The grids are copied one by one into a single array of their stored type (int16, or int32 for
    codebooks over 32767 codes): preallocated from the manifest's count, or grown in place when
    reading loose tars - no per-sample int64 copies and no list of tensors to stack, so the peak is
    the array itself (``experiments/code_loading`` measures it). ``dtype=None`` returns that array as
    it is (what :class:`~t2i.data.code_datamodule.CodesDataModule` holds); the default ``torch.long``
    converts the finished array once. ``links``: a list that receives each image's stored entity links
    (per caption ``[(entity_id, char_start, char_end), ...]``, or None).
    """
    shards = CodeShards(source, split)
    count = int(shards.manifest["count"].get(split, 0)) if shards.manifest else 0
    keys, captions, buf, n = [], [], None, 0
    for item in shards.arrays(with_links=links is not None):
        key, codes, caps = item[:3]
        if links is not None:
            links.append(item[3] and [[tuple(link) for link in cap] for cap in item[3]])
        if buf is None:
            buf = np.empty((count or 1024, *codes.shape), dtype=codes.dtype)
        if codes.shape != buf.shape[1:]:
            raise DataError(f"code shards {source} ({split}): sample {key} has a {list(codes.shape)} grid, "
                            f"earlier ones {list(buf.shape[1:])}; re-tokenize")
        if codes.dtype != buf.dtype:  # mixed int16/int32 shards: widen once
            buf = buf.astype(np.promote_types(buf.dtype, codes.dtype))
        if n == len(buf):
            buf.resize((2 * n, *buf.shape[1:]), refcheck=False)  # realloc: grows in place when it can
        buf[n] = codes
        keys.append(key)
        captions.append(caps)
        n += 1
    if buf is None:
        raise DataError(f"code shards {source} ({split}): no samples")
    if n != len(buf):
        buf.resize((n, *buf.shape[1:]), refcheck=False)
    out = torch.from_numpy(buf)
    return keys, (out if dtype is None else out.to(dtype)), captions
