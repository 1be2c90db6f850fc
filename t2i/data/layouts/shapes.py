"""The Shapes-layout benchmark: several Shapes objects per image, one per grid cell, with the class map
(background 0, each object ``1 + colour_index * 4 + shape_index``: 25 classes); ``t2i-data shapes_layout``
writes it."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from t2i.data.shapes import BACKGROUND, COLORS, POSITIONS, SHAPES, SIZES, ShapeSpec, render_alpha
from t2i.data.skips import DataError
from t2i.errors import ConfigError

log = logging.getLogger(__name__)


NUM_LAYOUT_CLASSES = 1 + len(COLORS) * len(SHAPES)  # 25: background + every (colour, shape)
LAYOUT_SPLITS = ("train", "val", "test")
LAYOUT_SALT = 21  # keeps layout streams apart from the single-shape benchmark's (same seed, same split)
JITTER = 0.5  # objects move at most half their slack inside the cell: neighbours never touch
# Large only by default: a small object at 32 px is ~5 px wide and its map (pixels covered >= 1/2) no longer
# shows its shape (a painted 5 px circle reads as a diamond); sizes=[small, large] adds them (fine at 64 px).
LAYOUT_SIZES = ("large",)


def layout_class(color: str, shape: str) -> int:
    """The class id of a (colour, shape) pair: ``1 + colour_index * 4 + shape_index``."""
    return 1 + list(COLORS).index(color) * len(SHAPES) + SHAPES.index(shape)


def class_attributes(cls: int) -> tuple[str, str] | None:
    """(colour, shape) of a class id; None for the background (0)."""
    if not 0 < int(cls) < NUM_LAYOUT_CLASSES:
        return None
    c, s = divmod(int(cls) - 1, len(SHAPES))
    return list(COLORS)[c], SHAPES[s]


@dataclass(frozen=True)
class LayoutObject:
    """One object: colour, shape, grid cell (a Shapes position), size and its jitter inside the cell."""

    color: str
    shape: str
    position: str
    size: str
    jitter: tuple[float, float] = (0.0, 0.0)

    @property
    def spec(self) -> ShapeSpec:
        return ShapeSpec(self.color, self.shape, self.position, self.size)

    @property
    def cls(self) -> int:
        return layout_class(self.color, self.shape)

    def to_dict(self) -> dict:
        return {"color": self.color, "shape": self.shape, "position": self.position, "size": self.size,
                "jitter": list(self.jitter), "class": self.cls}

    @classmethod
    def from_dict(cls, d: dict) -> LayoutObject:
        return cls(d["color"], d["shape"], d["position"], d["size"], tuple(float(j) for j in d.get("jitter", (0, 0))))


@dataclass(frozen=True)
class LayoutSpec:
    """The objects of one layout image (each in a different grid cell)."""

    objects: tuple[LayoutObject, ...]

    def __post_init__(self):
        cells = [o.position for o in self.objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"LayoutSpec: two objects share a grid cell ({cells})")

    def to_dict(self) -> dict:
        return {"objects": [o.to_dict() for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict) -> LayoutSpec:
        return cls(tuple(LayoutObject.from_dict(o) for o in d["objects"]))


def sample_layout(rng: np.random.Generator, min_objects: int = 1, max_objects: int = 3,
                  sizes=LAYOUT_SIZES) -> LayoutSpec:
    """A random layout: ``min_objects..max_objects`` objects in distinct cells, any colour / shape, a size of
    ``sizes``."""
    if not 1 <= min_objects <= max_objects <= len(POSITIONS):
        raise ConfigError(f"shapes_layout: need 1 <= min_objects ({min_objects}) <= max_objects ({max_objects}) "
                          f"<= {len(POSITIONS)}")
    k = int(rng.integers(min_objects, max_objects + 1))
    cells = sorted(rng.choice(len(POSITIONS), size=k, replace=False).tolist())
    objects = []
    for cell in cells:
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        size = sizes[int(rng.integers(len(sizes)))]
        jitter = tuple(float(j) for j in rng.uniform(-JITTER, JITTER, size=2))
        objects.append(LayoutObject(color, shape, POSITIONS[cell], size, jitter))
    return LayoutSpec(tuple(objects))


def render_layout(spec: LayoutSpec, image_size: int = 64, background=BACKGROUND) -> tuple[Image.Image, np.ndarray]:
    """The RGB image and its uint8 class map [H, W] (pixels an object covers at least half carry its class)."""
    bg = np.asarray(background, dtype=np.float32)
    pixels = np.broadcast_to(bg, (image_size, image_size, 3)).copy()
    label = np.zeros((image_size, image_size), dtype=np.uint8)
    for obj in spec.objects:
        alpha = render_alpha(obj.spec, image_size, obj.jitter)
        fg = np.asarray(COLORS[obj.color], dtype=np.float32)
        pixels += alpha[..., None] * (fg - pixels)
        label[alpha >= 0.5] = obj.cls
    return Image.fromarray(np.rint(pixels).astype(np.uint8), "RGB"), label


@dataclass
class LayoutSample:
    key: str
    spec: LayoutSpec
    image: Image.Image
    label: np.ndarray  # uint8 [H, W]


def iter_layouts(split: str, n: int, seed: int = 0, image_size: int = 64, min_objects: int = 1,
                 max_objects: int = 3, sizes=LAYOUT_SIZES) -> Iterator[LayoutSample]:
    """``n`` layouts of ``split``; sample ``i`` depends only on (seed, split, i, object counts, sizes), not on n or
    image size."""
    sizes = tuple(sizes)
    if not sizes or any(z not in SIZES for z in sizes):
        raise ConfigError(f"shapes_layout: sizes={list(sizes)}; use a non-empty subset of {list(SIZES)}")
    if split not in LAYOUT_SPLITS:
        raise ConfigError(f"shapes_layout: split={split!r} is not one of {LAYOUT_SPLITS}")
    for i in range(n):
        rng = np.random.default_rng([seed, LAYOUT_SALT, LAYOUT_SPLITS.index(split), i])
        spec = sample_layout(rng, min_objects, max_objects, sizes)
        image, label = render_layout(spec, image_size)
        yield LayoutSample(f"layout_{split}_{i:06d}", spec, image, label)


def make_layouts(split: str, n: int, seed: int = 0, image_size: int = 64, min_objects: int = 1,
                 max_objects: int = 3, sizes=LAYOUT_SIZES) -> list[LayoutSample]:
    return list(iter_layouts(split, n, seed, image_size, min_objects, max_objects, sizes))


def write_shapes_layout(output, n_train: int = 5000, n_val: int = 500, n_test: int = 500, image_size: int = 64,
                        seed: int = 0, min_objects: int = 1, max_objects: int = 3, sizes=LAYOUT_SIZES,
                        progress: bool = True) -> dict[str, Path]:
    """Write ``<output>/<split>/{images,labels}/<key>.png`` + ``<split>/specs.jsonl`` and ``meta.json``."""
    from rich.progress import Progress

    out = Path(output)
    counts = {"train": n_train, "val": n_val, "test": n_test}
    paths: dict[str, Path] = {}
    with Progress(disable=not progress, transient=True) as bar:
        for split, n in counts.items():
            task = bar.add_task(f"shapes_layout {split}", total=n)
            d = out / split
            (d / "images").mkdir(parents=True, exist_ok=True)
            (d / "labels").mkdir(parents=True, exist_ok=True)
            with open(d / "specs.jsonl", "w", encoding="utf-8") as f:
                for s in iter_layouts(split, n, seed, image_size, min_objects, max_objects, sizes):
                    s.image.save(d / "images" / f"{s.key}.png")
                    Image.fromarray(s.label, "L").save(d / "labels" / f"{s.key}.png")
                    f.write(json.dumps({"key": s.key, **s.spec.to_dict()}) + "\n")
                    bar.advance(task)
            paths[split] = d
    meta = {"kind": "shapes_layout", "counts": counts, "image_size": image_size, "seed": seed,
            "min_objects": min_objects, "max_objects": max_objects, "sizes": list(sizes),
            "num_classes": NUM_LAYOUT_CLASSES,
            "classes": {str(layout_class(c, s)): f"{c} {s}" for c in COLORS for s in SHAPES} | {"0": "background"},
            "jitter": JITTER, "background": list(BACKGROUND)}
    paths["meta"] = out / "meta.json"
    paths["meta"].write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return paths


def read_specs(path) -> dict[str, LayoutSpec]:
    """``specs.jsonl`` (or a split folder holding one) -> {key: LayoutSpec}."""
    p = Path(path)
    if p.is_dir():
        p = p / "specs.jsonl"
    if not p.is_file():
        raise DataError(f"{p}: no such file (the specs.jsonl `t2i-data shapes_layout` writes)")
    out = {}
    for line in p.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            out[row["key"]] = LayoutSpec.from_dict(row)
    return out
