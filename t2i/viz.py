"""Picture helpers shared by the image logger, ``t2i-generate`` and the demo report.

:func:`captioned_rows` lays images out one row per caption with the caption written on the left,
so a grid says what it shows. Chinese captions need a CJK font: the first found among common system
fonts (or ``$T2I_FONT``) is used; without one, PIL's built-in font draws what it can.
"""

from __future__ import annotations

import os
import textwrap
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

CJK_FONTS = (
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/System/Library/Fonts/PingFang.ttc",
    "C:/Windows/Fonts/msyh.ttc",
)


@lru_cache(maxsize=8)
def font(size: int = 12) -> ImageFont.ImageFont:
    for path in (os.environ.get("T2I_FONT"), *CJK_FONTS):
        if path and Path(path).is_file():
            try:
                return ImageFont.truetype(path, size)
            except OSError:
                continue
    return ImageFont.load_default(size=size)


def wrap(text: str, width: int) -> list[str]:
    """Wrap on spaces for English, by characters for CJK text (which has no spaces)."""
    if " " in text.strip():
        return textwrap.wrap(text, width) or [""]
    return [text[i:i + width] for i in range(0, max(len(text), 1), width)]


def captioned_rows(images: torch.Tensor, captions: list[str], per_row: int, text_width: int = 160,
                   pad: int = 2, font_size: int = 12) -> torch.Tensor:
    """``images`` ``[len(captions) * per_row, 3, H, W]`` in [-1, 1] -> one picture ``[1, 3, H', W']`` in
    [-1, 1]: a row per caption, the caption on a white panel at the left, then its ``per_row`` images."""
    n, _, h, w = images.shape
    if n != len(captions) * per_row:
        raise ValueError(f"captioned_rows: {n} images for {len(captions)} captions x {per_row}")
    f = font(font_size)
    chars = max(8, int(text_width / (font_size * 0.6)))
    line = font_size + 2
    row_h = max(h, line * max((len(wrap(c, chars)) for c in captions), default=1)) + pad
    canvas = Image.new("RGB", (text_width + per_row * (w + pad) + pad, len(captions) * row_h + pad), "white")
    draw = ImageDraw.Draw(canvas)
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).numpy()
    for r, caption in enumerate(captions):
        top = pad + r * row_h
        for k, text in enumerate(wrap(caption, chars)[: max(1, row_h // line)]):
            draw.text((pad, top + k * line), text, fill="black", font=f)
        for c in range(per_row):
            canvas.paste(Image.fromarray(pixels[r * per_row + c]), (text_width + pad + c * (w + pad), top))
    x = torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 127.5 - 1
    return x[None]
