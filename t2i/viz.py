"""Picture helpers shared by the image logger, ``t2i-generate``, ``t2i-eval`` and the demo report.

:func:`sample_grid` lays images out in a grid of readable cells: small images are upscaled with
nearest neighbour (an integer factor, so every pixel stays a sharp block) to at least ``min_cell``
pixels, every cell gets a grey border, and marked cells (the reranked pick) a red one.
:func:`captioned_rows` lays images out one row per caption with the caption written on the left,
so a grid says what it shows.

Chinese captions need a CJK font. The first font with Chinese glyphs among ``$T2I_FONT``, common
system paths, ``fc-list :lang=zh`` and matplotlib's font list is used; when there is none, the
captions fall back to PIL's font (boxes for Chinese characters) and one warning per process says so.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import subprocess
import textwrap
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

log = logging.getLogger("t2i.viz")

CJK_FONTS = (
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/opentype/noto/NotoSerifCJK-Regular.ttc",
    "/usr/share/fonts/google-noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/wenquanyi/wqy-microhei/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",
    "/usr/share/fonts/truetype/arphic/uming.ttc",
    "/System/Library/Fonts/PingFang.ttc",
    "/System/Library/Fonts/STHeiti Light.ttc",
    "/System/Library/Fonts/Hiragino Sans GB.ttc",
    "C:/Windows/Fonts/msyh.ttc",
    "C:/Windows/Fonts/simhei.ttf",
)
CJK_NAMES = re.compile(r"CJK|WenQuanYi|WQY|Droid Sans Fallback|Source Han|Noto Sans SC|Noto Serif SC|AR PL|"
                       r"SimHei|SimSun|YaHei|PingFang|Hiragino|Heiti|Songti|Sarasa|LXGW", re.I)
CJK_TEXT = re.compile(r"[\u2e80-\u9fff\uf900-\ufaff\uff00-\uffef]")
BORDER_RGB = (170, 170, 170)  # every cell
PICK_RGB = (230, 30, 30)  # the marked cell (the reranked pick)
_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Log ``message`` as a warning the first time ``key`` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


def has_cjk_glyphs(path) -> bool:
    """Whether the font file draws Chinese characters (not its missing-glyph box)."""
    try:
        f = ImageFont.truetype(str(path), 24)
    except (OSError, ValueError):
        return False

    def ink(text: str) -> bytes:
        im = Image.new("L", (80, 40))
        ImageDraw.Draw(im).text((4, 4), text, fill=255, font=f)
        return im.tobytes()

    han = ink("中文")
    return any(han) and han != ink("\U0010fffd\U0010fffd")


def _system_fonts():
    """Candidate CJK font files, lazily: common paths, then fontconfig's Chinese fonts, then matplotlib's
    list (imported only when nothing earlier was found)."""
    yield from (p for p in CJK_FONTS if Path(p).is_file())
    if shutil.which("fc-list"):
        try:
            out = subprocess.run(["fc-list", ":lang=zh", "file"], capture_output=True, text=True, timeout=10).stdout
            yield from sorted(line.split(":")[0].strip() for line in out.splitlines() if line.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        from matplotlib import font_manager

        fonts = sorted(f.fname for f in font_manager.fontManager.ttflist if CJK_NAMES.search(f.name))
    except Exception:  # matplotlib missing or its font cache unreadable: the other sources still count
        fonts = []
    yield from fonts


@lru_cache(maxsize=1)
def find_cjk_font() -> str | None:
    """The font file used for captions: ``$T2I_FONT`` when it has Chinese glyphs (else a warning and the
    search goes on), else the first system font that has them, else None."""
    env = os.environ.get("T2I_FONT")
    if env:
        if has_cjk_glyphs(env):
            return env
        warn_once("t2i_font", f"T2I_FONT={env} is not a readable font with Chinese glyphs; looking for a "
                              f"system CJK font instead")
    return next((p for p in _system_fonts() if has_cjk_glyphs(p)), None)


@lru_cache(maxsize=8)
def font(size: int = 12) -> ImageFont.ImageFont:
    """The caption font at ``size`` px: the CJK font of :func:`find_cjk_font`, else PIL's default."""
    path = find_cjk_font()
    if path:
        try:
            return ImageFont.truetype(path, size)
        except OSError:
            pass
    return ImageFont.load_default(size=size)


def caption_font(captions: list[str], size: int = 12) -> ImageFont.ImageFont:
    """:func:`font`, and the once-per-process warning when Chinese captions must fall back."""
    if find_cjk_font() is None and any(CJK_TEXT.search(c) for c in captions):
        warn_once("no_cjk_font", "no CJK font found: Chinese captions in image grids are drawn with PIL's "
                                 "default font and show as boxes; install one (e.g. `apt install "
                                 "fonts-noto-cjk`) or set T2I_FONT=/path/to/a CJK .ttf/.ttc")
    return font(size)


def upscale_factor(h: int, w: int, min_cell: int) -> int:
    """The integer nearest-neighbour factor that makes the longer side at least ``min_cell`` px."""
    return max(1, math.ceil(min_cell / max(h, w))) if min_cell else 1


def to_pixels(images: torch.Tensor, factor: int = 1, value_range=(-1.0, 1.0)) -> np.ndarray:
    """``[N, 3, H, W]`` floats in ``value_range`` -> uint8 ``[N, H * factor, W * factor, 3]`` (nearest upscale)."""
    lo, hi = value_range
    x = images.detach().float().cpu().clamp(lo, hi)
    x = ((x - lo) * (255.0 / (hi - lo))).round().to(torch.uint8)
    if factor > 1:
        x = x.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)
    return x.permute(0, 2, 3, 1).numpy()


def _cell(canvas: Image.Image, draw: ImageDraw.ImageDraw, pixels: np.ndarray, x: int, y: int, border: int,
          marked: bool) -> None:
    """Paste one cell at ``(x, y)`` inside a ``border``-px frame (red when ``marked``)."""
    h, w = pixels.shape[:2]
    if border:
        draw.rectangle([x - border, y - border, x + w + border - 1, y + h + border - 1],
                       fill=PICK_RGB if marked else BORDER_RGB)
    canvas.paste(Image.fromarray(pixels), (x, y))


def sample_grid(images: torch.Tensor, nrow: int = 8, min_cell: int = 128, border: int = 3, marked=(),
                value_range=(0.0, 1.0)) -> torch.Tensor:
    """``images [N, 3, H, W]`` -> one picture ``[3, H', W']`` in [0, 1] (ready for ``save_image``).

    ``nrow`` cells a row, each the image upscaled by :func:`upscale_factor` (nearest) and framed by a
    ``border``-px grey line; the cells whose index is in ``marked`` get a red frame (the reranked pick).
    Cell ``i`` starts at ``(border + (i // nrow) * (cell_h + border), border + (i % nrow) * (cell_w + border))``.
    """
    n, _, h, w = images.shape
    f = upscale_factor(h, w, min_cell)
    cols, rows = max(1, min(nrow, n)), max(1, math.ceil(n / max(1, nrow)))
    ch, cw = h * f, w * f
    canvas = Image.new("RGB", (cols * (cw + border) + border, rows * (ch + border) + border), BORDER_RGB)
    draw = ImageDraw.Draw(canvas)
    pixels, marked = to_pixels(images, f, value_range), set(int(i) for i in marked)
    for i in range(n):
        r, c = divmod(i, cols)
        if i not in marked:
            _cell(canvas, draw, pixels[i], border + c * (cw + border), border + r * (ch + border), border, False)
    for i in sorted(marked):  # last, so the red frame is not painted over by a neighbour's grey one
        if 0 <= i < n:
            r, c = divmod(i, cols)
            _cell(canvas, draw, pixels[i], border + c * (cw + border), border + r * (ch + border), border, True)
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 255.0


def wrap(text: str, width: int) -> list[str]:
    """Wrap on spaces for English, by characters for CJK text (which has no spaces)."""
    if " " in text.strip():
        return textwrap.wrap(text, width) or [""]
    return [text[i:i + width] for i in range(0, max(len(text), 1), width)]


def captioned_rows(images: torch.Tensor, captions: list[str], per_row: int, text_width: int = 160,
                   pad: int = 3, font_size: int = 14, min_cell: int = 128, marked=None) -> torch.Tensor:
    """``images`` ``[len(captions) * per_row, 3, H, W]`` in [-1, 1] -> one picture ``[1, 3, H', W']`` in
    [-1, 1]: a row per caption, the caption on a white panel at the left, then its ``per_row`` images,
    upscaled (nearest) to at least ``min_cell`` px, each in a ``pad``-px grey frame; ``marked[r]`` (a
    column index or None per row) gets a red frame - the reranked pick."""
    n, _, h, w = images.shape
    if n != len(captions) * per_row:
        raise ValueError(f"captioned_rows: {n} images for {len(captions)} captions x {per_row}")
    marked = list(marked) if marked is not None else [None] * len(captions)
    f = caption_font(captions, font_size)
    factor = upscale_factor(h, w, min_cell)
    h, w = h * factor, w * factor
    chars = max(8, int(text_width / (font_size * 0.6)))
    line = font_size + 2
    row_h = max(h, line * max((len(wrap(c, chars)) for c in captions), default=1)) + pad
    canvas = Image.new("RGB", (text_width + per_row * (w + pad) + pad, len(captions) * row_h + pad), "white")
    draw = ImageDraw.Draw(canvas)
    pixels = to_pixels(images, factor)
    for r, caption in enumerate(captions):
        top = pad + r * row_h
        for k, text in enumerate(wrap(caption, chars)[: max(1, row_h // line)]):
            draw.text((pad, top + k * line), text, fill="black", font=f)
        order = [c for c in range(per_row) if c != marked[r]] + ([marked[r]] if marked[r] is not None else [])
        for c in order:
            if 0 <= c < per_row:
                _cell(canvas, draw, pixels[r * per_row + c], text_width + pad + c * (w + pad), top, pad,
                      c == marked[r])
    x = torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 127.5 - 1
    return x[None]
