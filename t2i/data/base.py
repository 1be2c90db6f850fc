"""Shared pieces of the readers: :class:`Record`, :class:`Source`, and tolerant decoding helpers.

See :mod:`t2i.data.formats` for the readers and ``Record.ref``'s forms.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from t2i.data.skips import (
    BAD_BASE64,
    BAD_IMAGE,
    BAD_UTF8,
    EMPTY_CAPTION,
    MISSING_IMAGE,
    BadSample,
    DataError,
    SkipLog,
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
    # entity links per caption (knowledge, issue 19): [[(entity_id, char_start, char_end), ...], ...] or None
    links: list | None = None


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


def images_off_hint(key: str) -> str:
    """How to read a captions-only split: the t2i-data option, or the reader option in a data config."""
    if key == "input":  # t2i-data
        return "`require_images=false`"
    return f"`require_images: false` in the {key} entry of the data config"


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

    def inputs(self) -> list[Path]:
        """Files whose bytes :meth:`records` / :meth:`read_bytes` read (not image files found by name)."""
        return []

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

