"""Readers for the formats Chinese text-to-image benchmarks ship in.

Every reader is a :class:`Source`. ``records(log)`` makes one cheap pass over the caption /
index files (no image is decoded) and returns :class:`Record` s; ``load(rec)`` decodes one
image. Bad rows are counted in a :class:`~t2i.data.skips.SkipLog` by reason and location,
never raised: ``records`` skips parse-level problems, ``load`` raises :class:`BadSample`.

``Record.ref`` says where the image bytes are:

* ``None`` -- caption-only record (no image shipped);
* ``Path`` -- an image file;
* ``(Path, offset)`` -- the TSV line starting at byte ``offset``; its last column is base64;
* ``(Path, offset, size)`` -- ``size`` raw bytes at ``offset`` (a member inside a tar);
* ``bytes`` -- the encoded image itself.
"""

from __future__ import annotations

import base64
import binascii
import glob
import inspect
import io
import logging
import re
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from braceexpand import braceexpand
from PIL import Image

from t2i.data.skips import (
    BAD_BASE64,
    BAD_COLUMNS,
    BAD_IMAGE,
    BAD_UTF8,
    EMPTY_CAPTION,
    MISSING_CAPTION,
    MISSING_IMAGE,
    BadSample,
    DataError,
    SkipLog,
    require_path,
)

logger = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")  # preference order when a key has several
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass
class Record:
    key: str  # sample id
    captions: list[str]  # >= 1 non-empty, stripped captions
    ref: object  # where the image bytes are (see the module docstring)
    where: str  # "file.tsv:LINE" (1-based), "shard.tar:key" or a file path


# -- shared helpers --------------------------------------------------------------------------


def clean_captions(texts) -> list[str]:
    """Strip every caption and drop the empty ones."""
    return [t.strip() for t in texts if t.strip()]


def captions_from_bytes(data: bytes | str, where: str) -> list[str]:
    """A caption file's bytes (one caption a line) -> captions; raises BadSample."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise BadSample(BAD_UTF8, where, str(e)) from None
    captions = clean_captions(data.split("\n"))
    if not captions:
        raise BadSample(EMPTY_CAPTION, where, "caption text is blank")
    return captions


def b64decode(data: bytes | str, where: str) -> bytes:
    """Standard or url-safe base64, '=' padding optional; raises BadSample(BAD_BASE64)."""
    if isinstance(data, str):
        data = data.encode("ascii", "replace")  # '?' is not base64, so non-ASCII still fails
    s = data.strip().replace(b"-", b"+").replace(b"_", b"/")
    if not s:
        raise BadSample(BAD_BASE64, where, "image column is empty")
    s += b"=" * (-len(s) % 4)
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadSample(BAD_BASE64, where, str(e)) from None


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB copy; transparent pixels are composited onto white (not black)."""
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return im.convert("RGB")


def decode_image(data: bytes, where: str) -> Image.Image:
    """Encoded bytes -> fully loaded RGB image; raises BadSample(BAD_IMAGE), never a PIL error."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # decode now, so truncated files fail here
            return to_rgb(im)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
        raise BadSample(BAD_IMAGE, where, f"{type(e).__name__}: {e}") from None


def read_ref(ref, where: str) -> bytes:
    """The encoded image bytes a ``Record.ref`` points at; raises BadSample."""
    if ref is None:
        raise BadSample(MISSING_IMAGE, where, "this record has captions only")
    if isinstance(ref, bytes):
        return ref
    try:
        if isinstance(ref, tuple) and len(ref) == 2:  # TSV line; the image is the last column
            path, offset = ref
            with open(path, "rb") as f:
                f.seek(offset)
                line = f.readline()
            return b64decode(line.rstrip(b"\r\n").rsplit(b"\t", 1)[-1], where)
        if isinstance(ref, tuple) and len(ref) == 3:  # raw bytes inside a tar
            path, offset, size = ref
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(size)
            if len(data) != size:
                raise BadSample(BAD_IMAGE, where, f"file ends after {len(data)} of {size} bytes")
            return data
        return Path(ref).read_bytes()
    except FileNotFoundError as e:
        raise BadSample(MISSING_IMAGE, where, str(e)) from None
    except OSError as e:
        raise BadSample(BAD_IMAGE, where, str(e)) from None


def _lines(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """(1-based line number, byte offset, line without EOL/BOM) for every non-blank line."""
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.rstrip(b"\r\n")
            if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            if line.strip():
                yield lineno, offset, line
            offset += len(raw)


def _utf8(fields: list[bytes]) -> list[str] | None:
    try:
        return [f.decode("utf-8") for f in fields]
    except UnicodeDecodeError:
        return None


def _need_file(path: Path, key: str, value, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{key}={value}: {path} not found ({what})")
    return path


def _sibling_key(key: str, name: str) -> str:
    """Config key for another setting next to ``key``: ('data.path', 'image_dir') -> 'data.image_dir'."""
    return key.rsplit(".", 1)[0] + "." + name if "." in key else name


# -- base class ------------------------------------------------------------------------------


class Source:
    """A data set in some on-disk format. Subclasses implement :meth:`records`."""

    name = "source"

    def __init__(self, key: str = "input"):
        self.key = key
        self.log = SkipLog(name=self.name)

    def records(self, log: SkipLog) -> list[Record]:
        raise NotImplementedError

    def read_bytes(self, rec: Record) -> bytes:
        """The encoded image bytes of ``rec``; raises BadSample."""
        return read_ref(rec.ref, rec.where)

    def load(self, rec: Record) -> Image.Image:
        """Fully loaded RGB image of ``rec``; raises BadSample(BAD_BASE64 | BAD_IMAGE | MISSING_IMAGE)."""
        return decode_image(self.read_bytes(rec), rec.where)

    def load_sample(self, rec: Record) -> tuple[bytes, Image.Image]:
        """(encoded bytes, RGB image) of ``rec``; raises BadSample."""
        data = self.read_bytes(rec)
        return data, decode_image(data, rec.where)

    def __iter__(self) -> Iterator[tuple[str, Image.Image, list[str]]]:
        """Yield (key, image, captions) for every good sample; ``self.log`` is reset, then counts this pass."""
        log = self.log
        log.reset()
        for rec in self.records(log):
            try:
                image = self.load(rec)
            except BadSample as e:
                log.skip(e.reason, e.where)
                continue
            log.ok()
            yield rec.key, image, rec.captions


# -- 1. EasyNLP TSV --------------------------------------------------------------------------


class EasyNLPTSV(Source):
    """EasyNLP TSV: ``idx \\t text \\t base64`` lines, or ``idx \\t text`` (captions only).

    The file's column count (2 or 3) is the one most of its lines have; other lines are
    ``bad_columns``. Each line is its own record with key ``idx``; an idx used on several
    good lines becomes ``f"{idx}_{line}"`` on each of them. Checks per line, first failing
    wins: bad_columns, bad_utf8 (idx/text), empty_caption, missing_image (2-column file
    with ``require_images``).
    """

    name = "easynlp_tsv"

    def __init__(self, path, require_images: bool = True, key: str = "input"):
        super().__init__(key)
        self.path = require_path(path, key, "TSV file")
        self.require_images = require_images

    def _parse(self, log: SkipLog, require_images: bool) -> list[Record]:
        rows = [(lineno, offset, line.split(b"\t")) for lineno, offset, line in _lines(self.path)]
        counts = Counter(len(fields) for _, _, fields in rows if len(fields) in (2, 3))
        ncols = 2 if counts[2] > counts[3] else 3
        out = []
        for lineno, offset, fields in rows:
            where = f"{self.path}:{lineno}"
            if len(fields) != ncols:
                log.skip(BAD_COLUMNS, where)
                continue
            texts = _utf8(fields[:2])
            if texts is None:
                log.skip(BAD_UTF8, where)
                continue
            idx, text = texts[0].strip() or f"line{lineno}", texts[1].strip()
            if not text:
                log.skip(EMPTY_CAPTION, where)
                continue
            if ncols == 2 and require_images:
                log.skip(MISSING_IMAGE, where)
                continue
            out.append(Record(idx, [text], (self.path, offset) if ncols == 3 else None, where))
        used = Counter(r.key for r in out)
        for r in out:
            if used[r.key] > 1:
                r.key = f"{r.key}_{r.where.rsplit(':', 1)[1]}"
        return out

    def records(self, log: SkipLog) -> list[Record]:
        return self._parse(log, self.require_images)

    def read_captions(self, log: SkipLog | None = None) -> list[tuple[str, str]]:
        """(key, text) for every good line, with or without an image column."""
        return [(r.key, r.captions[0]) for r in self._parse(log or self.log, require_images=False)]


# -- 2. MUGE T2I -----------------------------------------------------------------------------


class MUGE(Source):
    """MUGE ECommerce-T2I: ``T2I_{split}.text.tsv`` (id, text) joined by id with ``T2I_{split}.img.tsv`` (id, base64).

    ``root`` is the folder holding the files, or one with an ``ECommerce-T2I/`` or
    ``{split}/`` sub-folder holding them. Several text rows for one id are several captions.
    Each text row of an id without image -> missing_image (text file:line); an image id with no
    text row at all -> missing_caption (img file:line); an image whose text rows were all bad is
    counted once per bad row only. A repeated image id keeps its first line. Records follow the
    img file's order. With ``require_images=False`` ids without image become records with
    ``ref=None`` (after the others) instead, and a missing img.tsv is fine (the test split ships
    without one); with ``require_images`` a missing img.tsv is a DataError.
    :meth:`read_captions` reads the text file only.
    """

    name = "muge"

    def __init__(self, root, split: str = "train", require_images: bool = True, key: str = "input"):
        super().__init__(key)
        root = require_path(root, key, "MUGE folder")
        self.split, self.require_images = split, require_images
        text_name = f"T2I_{split}.text.tsv"
        for folder in (root, root / "ECommerce-T2I", root / split):
            if (folder / text_name).is_file():
                break
        else:
            raise DataError(
                f"{key}={root}: no {text_name} in it, nor in its ECommerce-T2I/ or {split}/ folder"
            )
        self.text_path = folder / text_name
        self.img_path = folder / f"T2I_{split}.img.tsv"

    def _parse(self, log: SkipLog, require_images: bool, with_images: bool = True) -> list[Record]:
        caps: dict[str, list[str]] = {}
        wheres: dict[str, list[str]] = {}  # id -> locations of its good text rows
        seen: set[str] = set()  # ids with any text row, good or bad
        for lineno, _, line in _lines(self.text_path):
            where = f"{self.text_path}:{lineno}"
            fields = line.split(b"\t")
            if len(fields) > 1:
                seen.add(fields[0].decode("utf-8", "replace").strip())
            if len(fields) != 2:
                log.skip(BAD_COLUMNS, where)
                continue
            texts = _utf8(fields)
            if texts is None:
                log.skip(BAD_UTF8, where)
                continue
            id_, text = texts[0].strip(), texts[1].strip()
            if not text:
                log.skip(EMPTY_CAPTION, where)
                continue
            caps.setdefault(id_, []).append(text)
            wheres.setdefault(id_, []).append(where)
        if not with_images or not (require_images or self.img_path.is_file()):
            return [Record(i, c, None, wheres[i][0]) for i, c in caps.items()]
        if not self.img_path.is_file():
            raise DataError(
                f"{self.key}: {self.img_path} not found; MUGE's {self.split} split has captions only "
                f"here -- read it with require_images=False / read_captions()"
            )
        out, found = [], set()
        for lineno, offset, line in _lines(self.img_path):
            where = f"{self.img_path}:{lineno}"
            fields = line.split(b"\t")
            if len(fields) != 2:
                log.skip(BAD_COLUMNS, where)
                continue
            id_ = fields[0].decode("utf-8", "replace").strip()
            if id_ in found:
                continue
            found.add(id_)
            if id_ in caps:
                out.append(Record(id_, caps[id_], (self.img_path, offset), where))
            elif id_ not in seen:
                log.skip(MISSING_CAPTION, where)
        for id_, c in caps.items():
            if id_ in found:
                continue
            if require_images:
                for where in wheres[id_]:
                    log.skip(MISSING_IMAGE, where)
            else:
                out.append(Record(id_, c, None, wheres[id_][0]))
        return out

    def records(self, log: SkipLog) -> list[Record]:
        return self._parse(log, self.require_images)

    def read_captions(self, log: SkipLog | None = None) -> list[tuple[str, str]]:
        """(id, text) for every good text row; img.tsv is not read."""
        recs = self._parse(log or self.log, require_images=False, with_images=False)
        return [(r.key, c) for r in recs for c in r.captions]


# -- 3. COCO-CN ------------------------------------------------------------------------------


class COCOCN(Source):
    """COCO-CN: ids in ``coco-cn_{split}.txt``, captions in ``id#n \\t sentence`` lines, images from MS-COCO.

    ``root`` holds the text files (or its ``coco-cn-version1805v1.1/`` folder does).
    ``caption_file`` (default the human-written captions) may be a path or a name inside root.
    Images are looked up as ``image_dir/<id>.jpg``, then ``image_dir/<train2014|val2014>/<id>.jpg``
    after the id's prefix; ``image_dir`` defaults to root. Bad caption rows are counted only
    for ids of this split (and always when the id cannot be read); an id of the split with no
    caption row at all -> missing_caption, with no image file -> missing_image (split file:line).
    """

    name = "coco_cn"
    CAPTIONS = "imageid.human-written-caption.txt"

    def __init__(self, root, split: str = "train", image_dir=None, caption_file=None, key: str = "input"):
        super().__init__(key)
        root = require_path(root, key, "COCO-CN folder")
        if (root / "coco-cn-version1805v1.1").is_dir():
            root = root / "coco-cn-version1805v1.1"
        self.split = split
        self.split_path = _need_file(root / f"coco-cn_{split}.txt", key, root, f"COCO-CN split={split!r}")
        cap = Path(caption_file or self.CAPTIONS).expanduser()
        if not cap.is_absolute() and (root / cap).is_file():
            cap = root / cap
        self.caption_path = _need_file(cap, key, root, "COCO-CN caption file")
        self.image_dir = require_path(
            root if image_dir is None else image_dir, _sibling_key(key, "image_dir"), "image folder"
        )

    def _image_file(self, id_: str) -> Path | None:
        m = re.match(r"COCO_([a-z]+\d+)_", id_)
        for p in [self.image_dir / f"{id_}.jpg"] + (
            [self.image_dir / m.group(1) / f"{id_}.jpg"] if m else []
        ):
            if p.is_file():
                return p
        return None

    def records(self, log: SkipLog) -> list[Record]:
        caps: dict[str, list[str]] = {}
        bad: dict[str, list[tuple[str, str]]] = {}  # id -> [(reason, where)] of its bad rows
        for lineno, _, line in _lines(self.caption_path):
            where = f"{self.caption_path}:{lineno}"
            fields = line.split(b"\t")
            if len(fields) != 2:
                log.skip(BAD_COLUMNS, where)
                continue
            try:
                id_ = fields[0].decode("utf-8").strip().split("#", 1)[0]
            except UnicodeDecodeError:
                log.skip(BAD_UTF8, where)
                continue
            texts = _utf8(fields[1:])
            if texts is None or not texts[0].strip():
                bad.setdefault(id_, []).append((BAD_UTF8 if texts is None else EMPTY_CAPTION, where))
                continue
            caps.setdefault(id_, []).append(texts[0].strip())
        out, done = [], set()
        for lineno, _, line in _lines(self.split_path):
            where = f"{self.split_path}:{lineno}"
            try:
                id_ = line.decode("utf-8").strip().removesuffix(".jpg")
            except UnicodeDecodeError:
                log.skip(BAD_UTF8, where)
                continue
            if id_ in done:
                continue
            done.add(id_)
            for reason, w in bad.get(id_, []):
                log.skip(reason, w)
            if id_ not in caps:
                if id_ not in bad:
                    log.skip(MISSING_CAPTION, where)
                continue
            image = self._image_file(id_)
            if image is None:
                log.skip(MISSING_IMAGE, where)
                continue
            out.append(Record(id_, caps[id_], image, where))
        return out


# -- 4. image folder -------------------------------------------------------------------------


class ImageFolder(Source):
    """Images anywhere under ``root`` (recursive, sorted), captions in the same-stem ``.txt``.

    Key = path relative to root without suffix (with suffix if two images share a stem).
    Hidden files and folders (name starting with '.') are ignored, so are .txt files with no image.
    """

    name = "folder"

    def __init__(self, root, key: str = "input", exts=IMAGE_EXTS):
        super().__init__(key)
        self.root = require_path(root, key, "image folder")
        self.exts = {"." + e.lower().lstrip(".") for e in exts}

    def records(self, log: SkipLog) -> list[Record]:
        images = sorted(
            p.relative_to(self.root)
            for p in self.root.rglob("*")
            if p.suffix.lower() in self.exts and p.is_file()
        )
        images = [p for p in images if not any(part.startswith(".") for part in p.parts)]
        stems = Counter(p.with_suffix("").as_posix() for p in images)
        out = []
        for rel in images:
            path = self.root / rel
            txt = path.with_suffix(".txt")
            if not txt.is_file():
                log.skip(MISSING_CAPTION, str(path))
                continue
            try:
                captions = captions_from_bytes(txt.read_bytes(), str(txt))
            except BadSample as e:
                log.skip(e.reason, e.where)
                continue
            stem = rel.with_suffix("").as_posix()
            out.append(Record(stem if stems[stem] == 1 else rel.as_posix(), captions, path, str(path)))
        return out


# -- 5. webdataset shards --------------------------------------------------------------------


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
    return out


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
                            out.append(Record(k, captions, (path, image.offset_data, image.size), where))
                    with open(path, "rb") as f:  # a cut-off header ends the member list silently
                        f.seek(tar.offset)
                        tail = f.read(512)
                    if 0 < len(tail) < 512 and any(tail):
                        logger.warning(
                            "%s is cut off after byte %d: later samples are lost", path, tar.offset
                        )
            except (tarfile.TarError, EOFError) as e:
                raise DataError(f"{self.key}: {path} is not a readable uncompressed tar ({e})") from None
        return out


# -- factory ---------------------------------------------------------------------------------

SOURCES: dict[str, type[Source]] = {
    "easynlp_tsv": EasyNLPTSV,
    "muge": MUGE,
    "coco_cn": COCOCN,
    "folder": ImageFolder,
    "wds": WebDataset,
}


def open_source(source: str, *args, **kwargs) -> Source:
    """Build the reader named ``source`` (a key of :data:`SOURCES`) with its arguments."""
    cls = SOURCES.get(source)
    if cls is None:
        raise DataError(f"unknown data source {source!r}; valid: {', '.join(SOURCES)}")
    sig = inspect.signature(cls.__init__)
    try:
        sig.bind(None, *args, **kwargs)
    except TypeError as e:
        params = ", ".join(p for p in sig.parameters if p != "self")
        raise DataError(f"data source {source!r}: {e}; it takes ({params})") from None
    return cls(*args, **kwargs)
