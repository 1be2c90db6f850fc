"""Shapes: the embedded synthetic text-to-image benchmark (one shape per image, bilingual captions).

Every image shows one shape with four attributes: colour, shape, position on a 3x3 grid and size.
Captions come from a few templates per language (Chinese by default, English on request) and
:func:`parse_caption` inverts all of them, so any Shapes caption can be scored with
:mod:`t2i.data.oracle`. The ``compositional`` split holds (colour, shape) pairs never seen in
``train``/``val``/``test``. Everything is deterministic given ``seed``.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# -- vocabulary -------------------------------------------------------------------------------
# Six hues 50-60 degrees apart: mixing with the background changes saturation, never hue, so a
# blurred or reconstructed shape keeps its colour class.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "yellow": (230, 210, 20),
    "green": (40, 170, 60),
    "cyan": (20, 180, 210),
    "blue": (40, 70, 220),
    "purple": (170, 40, 210),
}
SHAPES = ("circle", "square", "triangle", "diamond")
POSITIONS = (
    "top_left", "top", "top_right",
    "left", "centre", "right",
    "bottom_left", "bottom", "bottom_right",
)  # row-major over the 3x3 grid
SIZES = ("small", "large")
SIZE_FRACTION = {"small": 0.5, "large": 0.85}  # side of the shape's bounding box / grid cell side
BACKGROUND = (255, 255, 255)
SPLITS = ("train", "val", "test", "compositional")

ZH = {
    "color": {"red": "红色", "yellow": "黄色", "green": "绿色", "cyan": "青色", "blue": "蓝色", "purple": "紫色"},
    "shape": {"circle": "圆形", "square": "正方形", "triangle": "三角形", "diamond": "菱形"},
    "position": {
        "top_left": "左上角", "top": "正上方", "top_right": "右上角",
        "left": "左侧", "centre": "正中间", "right": "右侧",
        "bottom_left": "左下角", "bottom": "正下方", "bottom_right": "右下角",
    },
    "size": {"small": "小", "large": "大"},
}
EN = {
    "color": {c: c for c in COLORS},
    "shape": {s: s for s in SHAPES},
    "position": {
        "top_left": "top left", "top": "top middle", "top_right": "top right",
        "left": "middle left", "centre": "centre", "right": "middle right",
        "bottom_left": "bottom left", "bottom": "bottom middle", "bottom_right": "bottom right",
    },
    "size": {"small": "small", "large": "large"},
}
EN_SIZE_ALT = {"small": "small", "large": "big"}  # template 1 says "big"

TEMPLATES = {
    "zh": (
        "一个{size}的{color}{shape}在{position}",
        "{position}有一个{size}的{color}{shape}",
        "画面{position}是一个{color}的{size}{shape}",
        "位于{position}的一个{size}{shape}，颜色为{color}",
    ),
    "en": (
        "a {size} {color} {shape} in the {position}",
        "a {size_alt} {color} {shape} at the {position}",
        "{position}: a {size} {color} {shape}",
        "a {color} {shape} of {size} size in the {position}",
    ),
}


@dataclass(frozen=True)
class ShapeSpec:
    """The four attributes of one Shapes image (canonical English ids, see the vocab constants)."""

    color: str
    shape: str
    position: str
    size: str

    def __post_init__(self):
        for name, vocab in (("color", COLORS), ("shape", SHAPES), ("position", POSITIONS), ("size", SIZES)):
            if getattr(self, name) not in vocab:
                raise ValueError(f"ShapeSpec.{name}={getattr(self, name)!r} is not one of {list(vocab)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ShapeSpec:
        return cls(d["color"], d["shape"], d["position"], d["size"])


def held_out_pairs() -> list[tuple[str, str]]:
    """(colour, shape) pairs reserved for the compositional split: one per colour, shapes in turn."""
    return [(c, SHAPES[(i + 1) % len(SHAPES)]) for i, c in enumerate(COLORS)]


def allowed_pairs(split: str) -> list[tuple[str, str]]:
    """The (colour, shape) pairs a split draws from."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}")
    held = set(held_out_pairs())
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    return [p for p in pairs if (p in held) == (split == "compositional")]


# -- rendering --------------------------------------------------------------------------------
def _outline(shape: str, cx: float, cy: float, half: float) -> list[tuple[float, float]]:
    """Polygon vertices of a shape centred at (cx, cy) with bounding-box half side ``half``."""
    if shape == "square":
        return [(cx - half, cy - half), (cx + half, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    if shape == "triangle":  # apex up, base at the bottom
        return [(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    if shape == "diamond":
        return [(cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy)]
    raise ValueError(shape)


def render_alpha(spec: ShapeSpec, image_size: int, jitter=(0.0, 0.0)) -> np.ndarray:
    """Anti-aliased coverage mask [H, W] in [0, 1]: drawn supersampled, then box-downsampled.

    ``jitter`` (dx, dy) in [-1, 1] moves the shape inside its cell, at most to the cell border.
    """
    factor = max(2, math.ceil(512 / image_size))
    big = image_size * factor
    cell = big / 3
    row, col = divmod(POSITIONS.index(spec.position), 3)
    side = SIZE_FRACTION[spec.size] * cell
    slack = (cell - side) / 2
    cx = (col + 0.5) * cell + float(jitter[0]) * slack
    cy = (row + 0.5) * cell + float(jitter[1]) * slack
    half = side / 2
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    if spec.shape == "circle":
        draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=255)
    else:
        draw.polygon(_outline(spec.shape, cx, cy, half), fill=255)
    return np.asarray(mask.reduce(factor), dtype=np.float32) / 255.0


def render(spec: ShapeSpec, image_size: int = 64, rng: np.random.Generator | None = None,
           jitter=None, background=BACKGROUND) -> Image.Image:
    """Draw ``spec`` as an RGB image (32..256 px). ``rng`` (or explicit ``jitter``) shifts it in its cell."""
    if not 8 <= image_size <= 1024:
        raise ValueError(f"image_size={image_size} is outside 8..1024")
    if jitter is None:
        jitter = rng.uniform(-1, 1, size=2) if rng is not None else (0.0, 0.0)
    alpha = render_alpha(spec, image_size, jitter)[..., None]
    bg = np.asarray(background, dtype=np.float32)
    fg = np.asarray(COLORS[spec.color], dtype=np.float32)
    pixels = bg + alpha * (fg - bg)
    return Image.fromarray(np.rint(pixels).astype(np.uint8), "RGB")


# -- captions ---------------------------------------------------------------------------------
def caption(spec: ShapeSpec, lang: str = "zh", template: int = 0) -> str:
    """The caption of ``spec`` from template number ``template`` of language ``lang``."""
    if lang not in TEMPLATES:
        raise ValueError(f"lang={lang!r} is not one of {list(TEMPLATES)}")
    words = ZH if lang == "zh" else EN
    fields = {k: words[k][getattr(spec, k)] for k in ("color", "shape", "position", "size")}
    fields["size_alt"] = EN_SIZE_ALT[spec.size]
    return TEMPLATES[lang][template].format(**fields)


def captions(spec: ShapeSpec, lang: str = "zh") -> list[str]:
    """All template captions of ``spec`` in ``lang``."""
    return [caption(spec, lang, t) for t in range(len(TEMPLATES[lang]))]


_ZH_COLOR = {"红": "red", "黄": "yellow", "绿": "green", "青": "cyan", "蓝": "blue", "紫": "purple"}
_ZH_SHAPE = {"圆": "circle", "方形": "square", "方块": "square", "三角": "triangle", "菱": "diamond"}
_EN_COLOR = {c: c for c in COLORS} | {"magenta": "purple", "violet": "purple"}
_EN_SHAPE = {s: s for s in SHAPES} | {"rhombus": "diamond"}
_EN_SIZE = {"small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large"}


def _one(found: set[str]) -> str | None:
    return next(iter(found)) if len(found) == 1 else None


def _position(row: int | None, col: int | None) -> str:
    return POSITIONS[3 * (1 if row is None else row) + (1 if col is None else col)]


def _parse_zh(text: str) -> ShapeSpec | None:
    color = _one({v for k, v in _ZH_COLOR.items() if k in text})
    shape = _one({v for k, v in _ZH_SHAPE.items() if k in text})
    size = _one({s for s, w in ZH["size"].items() if w in text})
    if None in (color, shape, size) or not any(ch in text for ch in "上下左右中"):
        return None
    row = 0 if "上" in text else 2 if "下" in text else None
    col = 0 if "左" in text else 2 if "右" in text else None
    return ShapeSpec(color, shape, _position(row, col), size)


def _parse_en(text: str) -> ShapeSpec | None:
    words = [w.rstrip("s") if w.rstrip("s") in _EN_SHAPE else w for w in re.findall(r"[a-z]+", text.lower())]
    color = _one({_EN_COLOR[w] for w in words if w in _EN_COLOR})
    shape = _one({_EN_SHAPE[w] for w in words if w in _EN_SHAPE})
    size = _one({_EN_SIZE[w] for w in words if w in _EN_SIZE})
    rows = {0 for w in words if w in ("top", "upper")} | {2 for w in words if w in ("bottom", "lower")}
    cols = {0 for w in words if w == "left"} | {2 for w in words if w == "right"}
    if not (rows or cols or {"centre", "center", "middle"} & set(words)):
        return None
    if None in (color, shape, size) or len(rows) > 1 or len(cols) > 1:
        return None
    return ShapeSpec(color, shape, _position(_one(rows), _one(cols)), size)


def parse_caption(text: str, lang: str | None = None) -> ShapeSpec | None:
    """Recover the spec from a Shapes caption of any template (``lang`` guessed when None).

    Returns None when an attribute is missing or ambiguous.
    """
    if lang is None:
        lang = "zh" if re.search(r"[\u4e00-\u9fff]", text) else "en"
    return _parse_zh(text) if lang == "zh" else _parse_en(text)


# -- splits -----------------------------------------------------------------------------------
@dataclass
class ShapeSample:
    """One benchmark item: ``captions`` holds every template; ``template`` is the one written to TSV."""

    key: str
    spec: ShapeSpec
    image: Image.Image
    captions: list[str]
    template: int = 0
    jitter: tuple[float, float] = (0.0, 0.0)

    @property
    def caption(self) -> str:
        return self.captions[self.template]


def iter_split(split: str, n: int, seed: int = 0, image_size: int = 64, lang: str = "zh") -> Iterator[ShapeSample]:
    """Yield ``n`` samples of ``split``; sample ``i`` depends only on (seed, split, i), not on n or size."""
    pairs = allowed_pairs(split)
    n_templates = len(TEMPLATES[lang])
    for i in range(n):
        rng = np.random.default_rng([seed, SPLITS.index(split), i])
        color, shape = pairs[rng.integers(len(pairs))]
        spec = ShapeSpec(color, shape, POSITIONS[rng.integers(len(POSITIONS))], SIZES[rng.integers(len(SIZES))])
        jitter = tuple(float(j) for j in rng.uniform(-1, 1, size=2))
        template = int(rng.integers(n_templates))
        image = render(spec, image_size, jitter=jitter)
        yield ShapeSample(f"shapes_{split}_{i:06d}", spec, image, captions(spec, lang), template, jitter)


def make_split(split: str, n: int, seed: int = 0, image_size: int = 64, lang: str = "zh") -> list[ShapeSample]:
    """The first ``n`` samples of ``split`` as a list (see :func:`iter_split`)."""
    return list(iter_split(split, n, seed, image_size, lang))


# -- writing ----------------------------------------------------------------------------------
def png_base64(image: Image.Image) -> str:
    """PNG-encode and base64 an image (the EasyNLP TSV image column)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def write_shapes(output, n_train: int = 5000, n_val: int = 500, n_test: int = 500, n_compositional: int = 500,
                 image_size: int = 64, lang: str = "zh", seed: int = 0, progress: bool = True) -> dict[str, Path]:
    """Write ``shapes_{split}.tsv`` (``key \\t caption \\t base64 PNG``, one caption per image),
    ``shapes_{split}.jsonl`` (key, spec, all captions) and ``meta.json`` under ``output``.

    Returns a dict of the written paths: ``{split}_tsv``, ``{split}_jsonl`` and ``meta``.
    """
    from rich.progress import Progress

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    counts = {"train": n_train, "val": n_val, "test": n_test, "compositional": n_compositional}
    paths: dict[str, Path] = {}
    with Progress(disable=not progress, transient=True) as bar:
        for split, n in counts.items():
            task = bar.add_task(f"shapes {split}", total=n)
            tsv, jsonl = out / f"shapes_{split}.tsv", out / f"shapes_{split}.jsonl"
            with open(tsv, "w", encoding="utf-8", newline="\n") as ft, open(jsonl, "w", encoding="utf-8") as fj:
                for s in iter_split(split, n, seed, image_size, lang):
                    ft.write(f"{s.key}\t{s.caption}\t{png_base64(s.image)}\n")
                    record = {"key": s.key, "spec": s.spec.to_dict(), "captions": s.captions, "template": s.template}
                    fj.write(json.dumps(record, ensure_ascii=False) + "\n")
                    bar.advance(task)
            paths[f"{split}_tsv"], paths[f"{split}_jsonl"] = tsv, jsonl
    meta = {
        "counts": counts,
        "image_size": image_size,
        "seed": seed,
        "lang": lang,
        "held_out_pairs": [list(p) for p in held_out_pairs()],
        "vocab": {"color": list(COLORS), "shape": list(SHAPES), "position": list(POSITIONS), "size": list(SIZES)},
        "palette": {c: list(rgb) for c, rgb in COLORS.items()},
        "background": list(BACKGROUND),
        "size_fraction": SIZE_FRACTION,
        "templates": {k: list(v) for k, v in TEMPLATES.items()},
    }
    paths["meta"] = out / "meta.json"
    paths["meta"].write_text(json.dumps(meta, ensure_ascii=False, indent=2), encoding="utf-8")
    return paths
