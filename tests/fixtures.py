"""Tiny in-memory images and data files for the data-format tests (nothing is downloaded)."""

from __future__ import annotations

import base64
import io
import random
import tarfile
from pathlib import Path

from PIL import Image


def make_image(seed: int = 0, size=(12, 8)) -> Image.Image:
    """A small RGB image of seeded random pixels (so its encodings are varied)."""
    rng = random.Random(seed)
    im = Image.new("RGB", size)
    im.putdata(
        [(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(size[0] * size[1])]
    )
    return im


def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png(seed: int = 0, size=(12, 8)) -> bytes:
    return encode(make_image(seed, size), "PNG")


def jpeg(seed: int = 0, size=(64, 48)) -> bytes:
    return encode(make_image(seed, size), "JPEG", quality=90)


def truncated_jpeg(seed: int = 0) -> bytes:
    data = jpeg(seed)
    return data[: len(data) // 2]


def b64(data: bytes, urlsafe: bool = False, pad: bool = True) -> str:
    s = (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(data).decode("ascii")
    return s if pad else s.rstrip("=")


def write_lines(path: Path, lines: list[str | bytes]) -> Path:
    """Write lines (str as UTF-8, bytes as they are), each ended by '\\n'."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join((x.encode("utf-8") if isinstance(x, str) else x) + b"\n" for x in lines))
    return path


def write_tar(path: Path, members: dict[str, bytes | str]) -> Path:
    """An uncompressed tar with the given member names and contents, in order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            data = data.encode("utf-8") if isinstance(data, str) else data
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and a.convert("RGB").tobytes() == b.convert("RGB").tobytes()
