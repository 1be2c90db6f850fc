"""Label-map sources: folders of images and label maps matched by stem in the layouts of ADE20K, COCO-Stuff,
Cityscapes, the Shapes layouts and any image / label folder pair; the skip reasons of label-map pairs and
the reading of one id map (:func:`read_id_map`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from t2i.data.layouts.shapes import NUM_LAYOUT_CLASSES
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
