"""Label maps + images for semantic image synthesis (SPADE, issue 21).

Two kinds of source:

* **Shapes layouts**: one or more Shapes objects per image, each in its own cell of the 3x3 grid (so they never
  overlap), drawn with the Shapes renderer, and beside each image its class map: background 0, and each object's
  pixels (coverage >= 1/2) ``1 + colour_index * 4 + shape_index`` (6 colours x 4 shapes + background = 25
  classes); objects are Shapes' ``large`` size unless ``sizes`` says otherwise (a ``small`` one is ~5 px at
  32 px, too small for its map to show its shape). The map fixes every object's colour, shape and position, so :func:`t2i.data.oracle.layout_accuracy`
  can check all three on a generated image. Deterministic given ``seed``; splits ``train`` / ``val`` / ``test``.
  Written by ``t2i-data shapes_layout`` as ``<output>/<split>/images/*.png``, ``<split>/labels/*.png`` (uint8
  class ids) and ``<split>/specs.jsonl``.
* **Folder readers** in the layouts of the public datasets, image and label matched by file stem:

  - ``ade20k``: ``ADEChallengeData2016/images/{training,validation}/*.jpg`` +
    ``annotations/{training,validation}/*.png``; ids used as they are (0 = unlabeled, 1..150): 151 classes.
  - ``coco_stuff``: ``train2017/*.jpg`` + ``stuffthingmaps_trainval2017/train2017/*.png`` (and ``val2017``);
    the maps hold 0..181 (COCO's 182 thing + stuff ids minus one) and 255 = unlabeled. We shift by one:
    ``255 -> 0`` (unlabeled), ``v -> v + 1``: 183 classes. Instance maps are optional: ``instance_dir``
    (``<stem>.png``, any integer ids, e.g. rendered from the panoptic annotations); the panoptic / instances JSON
    files themselves are not read.
  - ``cityscapes``: ``leftImg8bit/{train,val}/<city>/*_leftImg8bit.png`` +
    ``gtFine/{train,val}/<city>/*_gtFine_labelIds.png`` (ids 0..33, 0 = unlabeled; 35 classes as in SPADE) and
    ``*_gtFine_instanceIds.png`` (``class * 1000 + k`` for things, the class id elsewhere).
  - ``shapes_layout``: the folders ``t2i-data shapes_layout`` writes; ``label_folder``: any ``image_dir`` +
    ``label_dir`` pair (``ignore_label`` mapped to 0, ``label_offset`` added to the rest).

  A missing partner is counted when the folders are indexed; an undecodable image or map, an image and map of
  different sizes, or a class id outside ``0..num_classes-1`` when the pair is loaded. Every one is skipped and
  counted in a :class:`LayoutSkipLog` (a :class:`~t2i.data.skips.SkipLog` with the reasons below); past
  ``max_bad_fraction`` the run stops with one clear :class:`~t2i.data.skips.DataError`.

:class:`LabelMapDataModule` turns any of them into batches: ``image`` float [B, 3, H, W] in [-1, 1], ``label`` long
[B, H, W], ``instance`` long [B, H, W] (``has_instances`` only) and ``key``. Images and maps are resized together
(bicubic for the image, NEAREST for the maps) so the shorter side fits, then cropped to ``image_size`` x
``image_size * aspect_ratio`` (random crop and horizontal flip in training, centre crop otherwise).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from t2i.data.sampler import sample_rng, train_sampler
from t2i.data.shapes import BACKGROUND, COLORS, POSITIONS, SHAPES, SIZES, ShapeSpec, render_alpha
from t2i.data.skips import MISSING_IMAGE, REASONS, BadSample, DataError, SkipLog
from t2i.errors import ConfigError

log = logging.getLogger(__name__)
STAGES = ("train", "val", "test")

# -- skip reasons of label-map pairs (beside t2i.data.skips.REASONS) -------------------------------
MISSING_LABEL = "missing_label"  # an image without its label map
MISSING_INSTANCE = "missing_instance"  # has_instances: an image without its instance map
BAD_LABEL = "bad_label"  # the label / instance map does not decode
SIZE_MISMATCH = "size_mismatch"  # image and map (or instance map) of different sizes
LABEL_OUT_OF_RANGE = "label_out_of_range"  # a class id outside 0..num_classes-1 (after the reader's mapping)
LAYOUT_REASONS = (MISSING_LABEL, MISSING_INSTANCE, BAD_LABEL, SIZE_MISMATCH, LABEL_OUT_OF_RANGE)


class LayoutSkipLog(SkipLog):
    """A :class:`SkipLog` that also knows the label-map reasons (:data:`LAYOUT_REASONS`)."""

    reasons = REASONS + LAYOUT_REASONS


# == Shapes layouts ================================================================================
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


# == folder readers ================================================================================
@dataclass
class Pair:
    key: str
    image: Path
    label: Path
    instance: Path | None = None


@dataclass
class LabelFolder:
    """Images and label maps matched by stem (``<stem><image_suffix>`` and ``<stem><label_suffix>``).

    ``ignore_label`` (e.g. 255) becomes class 0; every other id gets ``label_offset`` added. ``instance_dir``
    (optional): instance maps ``<stem><instance_suffix>``. Folders are searched recursively when
    ``recursive`` (Cityscapes' per-city folders).
    """

    image_dir: Path
    label_dir: Path
    num_classes: int
    instance_dir: Path | None = None
    image_suffixes: tuple[str, ...] = (".jpg", ".jpeg", ".png")
    label_suffix: str = ".png"
    instance_suffix: str = ".png"
    ignore_label: int | None = None
    label_offset: int = 0
    recursive: bool = False
    name: str = "label_folder"
    key: str = "data"
    counts: dict = field(default_factory=dict)

    def __post_init__(self):
        for attr, what in (("image_dir", "image folder"), ("label_dir", "label-map folder"),
                           ("instance_dir", "instance-map folder")):
            p = getattr(self, attr)
            if p is None:
                continue
            p = Path(str(p)).expanduser()
            if not p.is_dir():
                raise DataError(f"{self.key}: no {what} at {p} ({self.name} layout; set data.root / the split "
                                "to the dataset's folder)")
            setattr(self, attr, p)

    def _files(self, folder: Path, suffixes) -> dict[str, Path]:
        suffixes = (suffixes,) if isinstance(suffixes, str) else tuple(suffixes)
        files = folder.rglob("*") if self.recursive else folder.iterdir()
        out: dict[str, Path] = {}
        for f in sorted(files):
            name = f.name
            for suf in suffixes:
                if name.lower().endswith(suf.lower()) and f.is_file():
                    out.setdefault(name[: len(name) - len(suf)], f)
                    break
        return out

    def pairs(self, slog: SkipLog) -> list[Pair]:
        """Every image with its map (and instance map); a missing partner is skipped and counted."""
        images = self._files(self.image_dir, self.image_suffixes)
        labels = self._files(self.label_dir, self.label_suffix)
        instances = self._files(self.instance_dir, self.instance_suffix) if self.instance_dir else None
        out = []
        for stem, img in images.items():
            if stem not in labels:
                slog.skip(MISSING_LABEL, str(img))
                continue
            inst = None
            if instances is not None:
                inst = instances.get(stem)
                if inst is None:
                    slog.skip(MISSING_INSTANCE, str(img))
                    continue
            out.append(Pair(stem, img, labels[stem], inst))
        for stem, lab in labels.items():
            if stem not in images:
                slog.skip(MISSING_IMAGE, str(lab))
        return out

    def map_label(self, arr: np.ndarray) -> np.ndarray:
        arr = arr.astype(np.int64)
        if self.ignore_label is None:
            return arr + self.label_offset if self.label_offset else arr
        ignore = arr == self.ignore_label
        arr = arr + self.label_offset
        arr[ignore] = 0
        return arr

    def load(self, pair: Pair) -> tuple[Image.Image, np.ndarray, np.ndarray | None]:
        """RGB image, class ids int64 [H, W], instance ids int64 [H, W] or None; raises BadSample."""
        from t2i.data.base import decode_image, read_ref

        image = decode_image(read_ref(pair.image, str(pair.image)), str(pair.image))
        label = self.map_label(read_id_map(pair.label))
        if label.shape != (image.height, image.width):
            raise BadSample(SIZE_MISMATCH, str(pair.label),
                            f"map {label.shape[1]}x{label.shape[0]}, image {image.width}x{image.height}")
        lo, hi = int(label.min()), int(label.max())
        if lo < 0 or hi >= self.num_classes:
            raise BadSample(LABEL_OUT_OF_RANGE, str(pair.label),
                            f"class ids {lo}..{hi} after mapping, outside 0..{self.num_classes - 1}")
        instance = None
        if pair.instance is not None:
            instance = read_id_map(pair.instance).astype(np.int64)
            if instance.shape != label.shape:
                raise BadSample(SIZE_MISMATCH, str(pair.instance), "instance map and label map differ in size")
        return image, label, instance


# PIL modes that hold one integer id per pixel. P is read by its palette indices (the PASCAL VOC way of storing
# class maps), never through its colours; "1" holds ids 0 and 1. Grey + alpha, colour, CMYK, float and
# multi-frame images are not id maps, whatever their values.
ID_MAP_MODES = ("L", "P", "1", "I;16", "I;16L", "I;16B", "I;16N", "I")


def read_id_map(path: Path) -> np.ndarray:
    """A label / instance map as an integer array [H, W] of its ids (uint8, uint16 or int32, as stored).

    Raises :class:`BadSample` (``bad_label``, naming the mode) for an image that is not one frame of one channel
    of integer ids (:data:`ID_MAP_MODES`), and for one that does not decode."""
    try:
        with Image.open(path) as im:
            frames = getattr(im, "n_frames", 1)
            if frames > 1:
                raise BadSample(BAD_LABEL, str(path), f"a {im.format} of {frames} frames (mode {im.mode}), not one "
                                "map of ids")
            if im.mode not in ID_MAP_MODES:
                bands = im.getbands()
                what = "float values" if im.mode == "F" else f"{len(bands)} channels: {'+'.join(bands)}"
                raise BadSample(BAD_LABEL, str(path), f"an image in mode {im.mode} ({what}), not a single-channel "
                                f"map of integer ids (modes {', '.join(ID_MAP_MODES)})")
            im.load()
            arr = np.asarray(im)
    except BadSample:
        raise
    except FileNotFoundError as e:
        raise BadSample(MISSING_IMAGE, str(path), str(e)) from None
    except Exception as e:  # PIL: OSError, SyntaxError, ValueError...
        raise BadSample(BAD_LABEL, str(path), f"{type(e).__name__}: {e}") from None
    return arr.astype(np.uint8) if arr.dtype == bool else arr


def _root(root, key: str = "data.root") -> Path:
    if root in (None, ""):
        raise DataError(f"{key} is not set: give the dataset folder with `{key}=...`")
    p = Path(str(root)).expanduser()
    if not p.is_dir():
        raise DataError(f"{key}={root}: no such folder")
    return p


def shapes_layout_source(root, split: str = "train", key: str = "data.root", **_) -> LabelFolder:
    d = _root(root, key) / split
    return LabelFolder(d / "images", d / "labels", NUM_LAYOUT_CLASSES, image_suffixes=(".png",),
                       name="shapes_layout", key=f"{key}/{split}")


ADE_SPLITS = {"train": "training", "val": "validation", "training": "training", "validation": "validation"}


def ade20k_source(root, split: str = "train", key: str = "data.root", **_) -> LabelFolder:
    r = _root(root, key)
    if (r / "ADEChallengeData2016").is_dir():
        r = r / "ADEChallengeData2016"
    s = ADE_SPLITS.get(split)
    if s is None:
        raise ConfigError(f"ade20k: split={split!r}; use one of train, val (training, validation)")
    return LabelFolder(r / "images" / s, r / "annotations" / s, 151, image_suffixes=(".jpg",), name="ade20k",
                       key=key)


def coco_stuff_source(root, split: str = "train", key: str = "data.root", instance_dir=None, **_) -> LabelFolder:
    r = _root(root, key)
    s = split if split.endswith("2017") else f"{split}2017"
    return LabelFolder(r / s, r / "stuffthingmaps_trainval2017" / s, 183, instance_dir=instance_dir,
                       image_suffixes=(".jpg",), ignore_label=255, label_offset=1, name="coco_stuff", key=key)


def cityscapes_source(root, split: str = "train", key: str = "data.root", instances: bool = True,
                      **_) -> LabelFolder:
    r = _root(root, key)
    return LabelFolder(r / "leftImg8bit" / split, r / "gtFine" / split, 35,
                       instance_dir=(r / "gtFine" / split) if instances else None,
                       image_suffixes=("_leftImg8bit.png",), label_suffix="_gtFine_labelIds.png",
                       instance_suffix="_gtFine_instanceIds.png", recursive=True, name="cityscapes", key=key)


def label_folder_source(image_dir=None, label_dir=None, num_classes: int = 0, instance_dir=None,
                        ignore_label=None, label_offset: int = 0, key: str = "data", **_) -> LabelFolder:
    if not image_dir or not label_dir:
        raise DataError(f"{key}: label_folder needs image_dir=... and label_dir=...")
    return LabelFolder(image_dir, label_dir, int(num_classes), instance_dir=instance_dir, ignore_label=ignore_label,
                       label_offset=int(label_offset), key=key)


SOURCES = {"shapes_layout": shapes_layout_source, "ade20k": ade20k_source, "coco_stuff": coco_stuff_source,
           "cityscapes": cityscapes_source, "label_folder": label_folder_source}


def open_label_source(source: str, root=None, split=None, key: str = "data", **kwargs) -> LabelFolder:
    """A reader by name: ``split`` is a split name under ``root``, or a dict of reader arguments."""
    if source not in SOURCES:
        raise ConfigError(f"data.source={source!r}: use one of {', '.join(SOURCES)}")
    args = dict(kwargs)
    if isinstance(split, dict):
        args.update(split)
    elif split is not None:
        args["split"] = str(split)
    args.setdefault("root", root)
    if source == "label_folder":
        args.pop("root", None)
        args.pop("split", None)
    return SOURCES[source](key=key, **args)


# == transforms + dataset ==========================================================================
def fit_pair(image: Image.Image, maps: list[np.ndarray | None], height: int, width: int,
             rng=None, flip: bool = False) -> tuple[np.ndarray, list[np.ndarray | None]]:
    """Resize image (bicubic) and maps (NEAREST) together so both sides cover (height, width), then crop
    (random with ``rng``: a ``random.Random``, else centre) and flip horizontally with ``rng`` when ``flip``.
    Returns uint8 [height, width, 3] and the maps as int64 [height, width]."""
    w, h = image.size
    scale = max(height / h, width / w)
    nw, nh = max(width, round(w * scale)), max(height, round(h * scale))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0)
        maps = [None if m is None else resize_nearest(m, nw, nh) for m in maps]
    if rng is not None:
        left, top = rng.randint(0, nw - width), rng.randint(0, nh - height)
    else:
        left, top = (nw - width) // 2, (nh - height) // 2
    img = np.asarray(image.convert("RGB"))[top:top + height, left:left + width]
    maps = [None if m is None else m[top:top + height, left:left + width] for m in maps]
    if flip and rng is not None and rng.random() < 0.5:
        img = img[:, ::-1]
        maps = [None if m is None else m[:, ::-1] for m in maps]
    return np.array(img, copy=True), [None if m is None else np.array(m, copy=True) for m in maps]


def resize_nearest(m: np.ndarray, width: int, height: int) -> np.ndarray:
    """NEAREST resize of an integer map (any range: done on int32 'I' images)."""
    return np.asarray(Image.fromarray(m.astype(np.int32), "I").resize((width, height), Image.NEAREST)).astype(np.int64)


class LabelMapPairs(Dataset):
    """Map-style dataset of (image, label map[, instance map]) pairs; a failed pair returns a ``bad`` marker."""

    def __init__(self, source: LabelFolder, pairs: list[Pair], height: int, width: int, train: bool,
                 flip: bool = True, random_crop: bool = True):
        self.source, self.pairs = source, pairs
        self.height, self.width, self.train, self.flip, self.random_crop = height, width, train, flip, random_crop

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, idx) -> dict:
        idx, rng = sample_rng(idx)
        if rng is None and self.train:
            import random

            rng = random.Random(int(torch.randint(2**31, ()).item()))
        pair = self.pairs[idx]
        try:
            image, label, instance = self.source.load(pair)
        except BadSample as e:
            return {"bad": (e.reason, e.where)}
        crop_rng = rng if (self.train and self.random_crop) else None
        img, (label, instance) = fit_pair(image, [label, instance], self.height, self.width, crop_rng,
                                          flip=self.train and self.flip)
        if self.train and not self.random_crop and self.flip and rng is not None and rng.random() < 0.5:
            img, label = np.ascontiguousarray(img[:, ::-1]), np.ascontiguousarray(label[:, ::-1])
            instance = None if instance is None else np.ascontiguousarray(instance[:, ::-1])
        item = {"image": torch.from_numpy(img), "label": torch.from_numpy(label), "key": pair.key}
        if instance is not None:
            item["instance"] = torch.from_numpy(instance)
        return item


def collate_pairs(items: list[dict]) -> dict:
    good = [x for x in items if "bad" not in x]
    batch = {"skipped": [x["bad"] for x in items if "bad" in x], "key": [x["key"] for x in good]}
    if good:
        batch["image"] = torch.stack([x["image"] for x in good])  # uint8 [B, H, W, 3]
        batch["label"] = torch.stack([x["label"] for x in good]).long()
        if all("instance" in x for x in good):
            batch["instance"] = torch.stack([x["instance"] for x in good]).long()
    else:
        batch["image"] = torch.empty(0, 1, 1, 3, dtype=torch.uint8)
        batch["label"] = torch.empty(0, 1, 1, dtype=torch.long)
    return batch


def image_hw(image_size, aspect_ratio: float = 1.0) -> tuple[int, int]:
    """(height, width) from ``image_size`` (the height) and ``aspect_ratio`` (width / height)."""
    h = int(image_size)
    return h, int(round(h * float(aspect_ratio)))


class LabelMapDataModule(pl.LightningDataModule):
    """Label-map + image batches from ``source`` (shapes_layout, ade20k, coco_stuff, cityscapes, label_folder).

    ``train`` / ``val`` / ``test``: a split name under ``root`` (``train``, ``val``, ...), a dict of reader
    arguments, or null. ``num_classes`` must cover the reader's ids (ids past it are skipped as
    ``label_out_of_range``); ``has_instances`` adds ``batch["instance"]`` (a reader without instance maps is a
    config error). ``shapes_layout`` (a dict of :func:`write_shapes_layout` arguments with ``output``) builds the
    Shapes layouts on first use under ``root``. Skips are counted per split in ``self.logs`` (the
    :class:`~t2i.callbacks.data_report.DataReport` callback reports and checks them every epoch).
    """

    def __init__(self, source: str = "shapes_layout", root=None, train="train", val="val", test="test",
                 image_size: int = 64, aspect_ratio: float = 1.0, num_classes: int = NUM_LAYOUT_CLASSES,
                 has_instances: bool = False, batch_size: int = 16, eval_batch_size: int | None = None,
                 num_workers: int = 2, persistent_workers: bool = True, pin_memory: bool = True,
                 random_flip: bool = True, random_crop: bool = True, max_bad_fraction: float = 0.01,
                 instance_dir=None, shapes_layout: dict | None = None, seed: int = 0):
        super().__init__()
        self.save_hyperparameters(logger=False)
        if source not in SOURCES:
            raise ConfigError(f"data.source={source!r}: use one of {', '.join(SOURCES)}")
        self.splits = {"train": train, "val": val, "test": test}
        self.height, self.width = image_hw(image_size, aspect_ratio)
        self.logs = {s: LayoutSkipLog(max_bad_fraction, name=f"{s} data") for s in STAGES}
        self.index_logs: dict[str, SkipLog] = {}
        self.datasets: dict[str, LabelMapPairs] = {}
        self.specs: dict[str, LayoutSpec] = {}  # shapes_layout: key -> its objects (the oracle's ground truth)
        self.tokenizer = None

    # -- building -------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Write the Shapes layouts (``shapes_layout`` set) unless the same ones are already on disk."""
        cfg = self.hparams.shapes_layout
        if not cfg or self.hparams.source != "shapes_layout":
            return
        cfg = dict(cfg)
        out = Path(str(cfg.pop("output", None) or self.hparams.root))
        cfg.setdefault("progress", False)
        meta = out / "meta.json"
        built = json.loads(meta.read_text()) if meta.exists() else None
        want = {"counts": {s: cfg.get(f"n_{s}") for s in LAYOUT_SPLITS}, "image_size": cfg.get("image_size"),
                "seed": cfg.get("seed"), "min_objects": cfg.get("min_objects"), "max_objects": cfg.get("max_objects"),
                "sizes": list(cfg["sizes"]) if cfg.get("sizes") is not None else None}
        stale = built is None or any(built.get(k) != v for k, v in want.items() if v is not None and k != "counts") \
            or any(built["counts"].get(s) != n for s, n in want["counts"].items() if n is not None)
        if stale:
            log.info("%s the Shapes layouts in %s", "rebuilding" if built else "building", out)
            write_shapes_layout(out, **cfg)

    def _open(self, split: str) -> LabelFolder:
        extra = {}
        if self.hparams.instance_dir and self.hparams.source == "coco_stuff":
            extra["instance_dir"] = self.hparams.instance_dir
        if self.hparams.source == "cityscapes":
            extra["instances"] = bool(self.hparams.has_instances)
        src = open_label_source(self.hparams.source, self.hparams.root, self.splits[split], key="data.root",
                                **extra)
        if src.num_classes > self.hparams.num_classes:
            raise ConfigError(f"data.num_classes={self.hparams.num_classes} but {src.name} has {src.num_classes} "
                              f"classes; set data.num_classes={src.num_classes}")
        src.num_classes = int(self.hparams.num_classes)
        if self.hparams.has_instances and src.instance_dir is None:
            raise ConfigError(f"data.has_instances=true but {src.name} has no instance maps here "
                              "(coco_stuff: set data.instance_dir; or data.has_instances=false)")
        return src

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",),
                  None: STAGES}[stage]
        for split in wanted:
            if split in self.datasets or self.splits[split] is None:
                continue
            src = self._open(split)
            ilog = LayoutSkipLog(self.hparams.max_bad_fraction, name=f"{split} index ({src.name})")
            pairs = src.pairs(ilog)
            ilog.ok(len(pairs))
            self.index_logs[split] = ilog
            if ilog.n_bad:
                log.warning(ilog.summary())
            ilog.check()
            if not pairs:
                raise DataError(f"data.{split}: no image + label-map pairs in {src.image_dir}")
            self.datasets[split] = LabelMapPairs(src, pairs, self.height, self.width, train=split == "train",
                                                 flip=self.hparams.random_flip, random_crop=self.hparams.random_crop)
            if self.hparams.source == "shapes_layout":
                specs = src.image_dir.parent / "specs.jsonl"
                if specs.is_file():
                    self.specs.update(read_specs(specs))

    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    # -- loaders -----------------------------------------------------------------------------------
    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            raise DataError(f"data.{split} is not set: give the {split} split with `data.{split}=...`")
        ds = self.datasets[split]
        bs = self.hparams.batch_size if split == "train" else (self.hparams.eval_batch_size or self.hparams.batch_size)
        sampler, generator = None, torch.Generator().manual_seed(self.hparams.seed)
        if shuffle:
            sampler, generator = train_sampler(self, ds, bs, self.hparams.seed)
        workers = self.hparams.num_workers
        return DataLoader(ds, batch_size=bs, sampler=sampler, generator=generator, num_workers=workers,
                          persistent_workers=self.hparams.persistent_workers and workers > 0,
                          pin_memory=self.hparams.pin_memory and torch.cuda.is_available(),
                          collate_fn=collate_pairs, drop_last=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        if "val" not in self.datasets:
            log.warning("no validation split (data.val unset): skipping validation")
            return []
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def has_split(self, split: str) -> bool:
        return self.splits[split] is not None or split in self.datasets

    # -- accounting ----------------------------------------------------------------------------
    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        batch = finish_batch(batch)
        skipped = batch.pop("skipped", [])
        split = self._current_split()
        if split is not None:
            slog = self.logs[split]
            for reason, where in skipped:
                slog.skip(reason, where)
            slog.ok(len(batch["key"]))
        return batch

    def _current_split(self) -> str | None:
        trainer = self.trainer
        if trainer is None or trainer.sanity_checking:
            return None
        if trainer.training:
            return "train"
        if trainer.validating:
            return "val"
        if trainer.testing:
            return "test"
        return None


def finish_batch(batch: dict) -> dict:
    """uint8 [B, H, W, 3] images -> float [B, 3, H, W] in [-1, 1] (on the batch's device)."""
    from t2i.data.transforms import from_raw

    if batch["image"].dtype == torch.uint8:
        batch["image"] = from_raw(batch["image"])
    return batch

