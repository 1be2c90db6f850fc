"""Webdataset tar shards (the img2dataset layout) as a :class:`~t2i.data.base.Source`, plus the
helpers the streaming loader shares: URL expansion and per-sample decoding."""

from __future__ import annotations

import glob
import json
import tarfile
from pathlib import Path

from braceexpand import braceexpand
from PIL import Image

from t2i.data.base import WDS_IMAGE_EXTS, Record, Source, captions_from_bytes, decode_image, to_rgb
from t2i.data.skips import (
    MISSING_CAPTION,
    MISSING_IMAGE,
    BadSample,
    DataError,
    SkipLog,
    require_path,
)

INCOMPLETE = ".t2i-incomplete"  # in a shard folder while t2i-data convert moves finished shards in


def incomplete_marker(folder: Path) -> Path:
    """The file that marks ``folder`` while finished shards move into it one by one
    (:func:`t2i.data.shards.move_into`); readers refuse a folder that has it."""
    return Path(folder) / INCOMPLETE


def check_complete(folder: Path, key: str = "input") -> None:
    """A DataError when ``folder`` holds the mark of a conversion that was killed while moving its shards in."""
    if incomplete_marker(folder).is_file():
        raise DataError(f"{key}={folder}: its shards are an incomplete set (a t2i-data convert was killed while "
                        f"moving them in; {INCOMPLETE} marks it): rerun that convert with overwrite=true")


def expand_urls(urls, key: str = "input") -> list[Path]:
    """A path, folder (its *.tar), glob, brace pattern or list of them -> existing tar paths."""
    items = [urls] if isinstance(urls, (str, Path)) else list(urls or [])
    if not items:
        require_path(None, key, "tar file, glob or brace pattern")
    out: list[Path] = []
    for item in items:
        for pattern in braceexpand(str(item)):
            if glob.has_magic(pattern):
                hits = sorted(glob.glob(str(Path(pattern).expanduser())))
                if not hits:
                    raise DataError(f"{key}={item}: no file matches {pattern}")
                out += [Path(h) for h in hits]
                continue
            p = require_path(pattern, key, "tar file")
            out += sorted(p.glob("*.tar")) if p.is_dir() else [p]
    if not out:
        raise DataError(f"{key}={urls}: no .tar files found")
    for folder in sorted({p.parent for p in out}):
        check_complete(folder, key)
    return out


def tail_problem(path: Path, end: int) -> str | None:
    """What is wrong after the last member ``tarfile`` could read (it stops silently at a cut-off or
    corrupt header): a whole archive ends there with two zero blocks."""
    with open(path, "rb") as f:
        f.seek(end)
        block = f.read(1024)
    if len(block) < 1024:
        return f"is cut off after byte {end} (no end-of-archive marker): the samples after it are lost"
    if any(block):
        return f"has a corrupt tar header at byte {end}: the samples after it cannot be read"
    return None


def check_tar(path: Path | str) -> str | None:
    """None for a whole, readable uncompressed tar; otherwise what is wrong with it (reads headers only)."""
    path = Path(path)
    size = path.stat().st_size
    if size % 512:
        return f"is truncated ({size} bytes is not a whole number of 512-byte tar blocks)"
    try:
        with tarfile.open(path, "r:") as tar:
            for _ in tar:
                pass
            end = tar.offset
    except (tarfile.TarError, EOFError) as e:
        return f"is not a readable uncompressed tar ({e})"
    return tail_problem(path, end)


def split_member(name: str) -> tuple[str, str]:
    """'dir/abc.seg.png' -> ('dir/abc', 'seg.png'): the key ends at the first dot of the basename."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def decode_wds_sample(sample: dict, where: str | None = None) -> tuple[str, Image.Image, list[str]]:
    """A webdataset dict ({'__key__', 'jpg', 'txt', ...}) -> (key, RGB image, captions); raises BadSample."""
    key = sample.get("__key__")
    where = where or f"{sample.get('__url__', '?')}:{key}"
    ext = next((e for e in WDS_IMAGE_EXTS if sample.get(e) is not None), None)
    if ext is None:
        raise BadSample(MISSING_IMAGE, where, f"no {'/'.join(WDS_IMAGE_EXTS)} entry")
    if sample.get("txt") is None:
        raise BadSample(MISSING_CAPTION, where, "no txt entry")
    captions = captions_from_bytes(sample["txt"], where)
    data = sample[ext]
    image = to_rgb(data) if isinstance(data, Image.Image) else decode_image(data, where)
    return key, image, captions


def json_links(data: bytes | None, n_captions: int) -> list | None:
    """The entity links ``t2i-data convert knowledge.lexicon=...`` stored in a sample json (one list per
    caption of ``(entity_id, char_start, char_end)``), or None (no json, no links, or not one per caption)."""
    if data is None:
        return None
    try:
        links = json.loads(data).get("links")
        if not isinstance(links, list) or len(links) != n_captions:
            return None
        return [[tuple(int(v) for v in link) for link in caption] for caption in links]
    except (ValueError, AttributeError, TypeError):
        return None


def _stored_links(tar, member, n_captions: int) -> list | None:
    if member is None:
        return None
    try:
        return json_links(tar.extractfile(member).read(), n_captions)
    except tarfile.TarError:
        return None


def shard_has_links(path) -> bool:
    """Whether the first sample json of a shard carries entity links (streaming decides on knowledge keys)."""
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if m.isfile() and m.name.endswith(".json"):
                    return "links" in json.loads(tar.extractfile(m).read())
    except (tarfile.TarError, OSError, ValueError, EOFError):
        return False
    return False


class WebDataset(Source):
    """Webdataset tars in the img2dataset layout: ``key.jpg|jpeg|png|webp`` + ``key.txt`` [+ ``key.json``].

    ``urls``: path, folder, glob, brace pattern (``data/{00000..00009}.tar``) or a list.
    Tars must be uncompressed (images are read back by seeking). The txt may hold several
    captions, one a line. Records follow tar order; where = ``"shard.tar:key"``.
    """

    name = "wds"

    def __init__(self, urls, key: str = "input"):
        super().__init__(key)
        self.paths = expand_urls(urls, key)

    def inputs(self) -> list[Path]:
        return list(self.paths)

    def records(self, log: SkipLog) -> list[Record]:
        out = []
        for path in self.paths:
            try:
                with tarfile.open(path, "r:") as tar:
                    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
                    for m in tar:
                        if m.isfile():
                            k, ext = split_member(m.name)
                            groups.setdefault(k, {})[ext] = m
                    for k, members in groups.items():
                        where = f"{path}:{k}"
                        image = next((members[e] for e in WDS_IMAGE_EXTS if e in members), None)
                        if image is None:
                            log.skip(MISSING_IMAGE, where)
                        elif "txt" not in members:
                            log.skip(MISSING_CAPTION, where)
                        else:
                            try:
                                captions = captions_from_bytes(tar.extractfile(members["txt"]).read(), where)
                            except BadSample as e:
                                log.skip(e.reason, e.where)
                                continue
                            except tarfile.TarError:  # txt member cut off at the end of the file
                                log.skip(MISSING_CAPTION, where)
                                continue
                            links = _stored_links(tar, members.get("json"), len(captions))
                            out.append(Record(k, captions, (path, image.offset_data, image.size), where, links))
                    problem = tail_problem(path, tar.offset)
                    if problem:
                        raise DataError(f"{self.key}: shard {path} {problem}; rebuild it with `t2i-data convert` "
                                        "or drop it from the list")
            except (tarfile.TarError, EOFError) as e:
                raise DataError(f"{self.key}: {path} is not a readable uncompressed tar ({e})") from None
        return out

