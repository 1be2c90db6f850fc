"""Rule-based Shapes reader: recovers (colour, shape, position, size) from an image, and scores.

The reader estimates the background from the image border, classifies the median of the most
contrasting pixels by its distance to each background-to-palette segment (so a colour washed out
by blur or anti-aliasing keeps its class), turns the image into a soft coverage map ``alpha``
for that colour and reads the rest from it:

* position: the 3x3 cell holding the alpha-weighted centroid;
* size: the bounding-box side (sum of per-column / per-row maximum coverage, sub-pixel exact
  for anti-aliased edges) relative to the cell side, split between the two size classes;
* shape: two scale-free central moments that an isotropic blur does not change: the third
  moment of y (an apex-up triangle's mass sits low; the other shapes are symmetric) and the
  mean of Re((x+iy)^4) (a 4-fold pattern: square -1, circle 0, diamond +1 after scaling);
  the nearest of four prototypes wins.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from t2i.data.shapes import COLORS, POSITIONS, SIZE_FRACTION, ShapeSpec

ATTRIBUTES = ("color", "shape", "position", "size")
PALETTE = np.array(list(COLORS.values()), dtype=np.float32)
MIN_CONTRAST = 60.0  # RGB distance from the background below which nothing is drawn
ALPHA_FLOOR = 0.15  # coverage below this is noise (JPEG ringing, blur tails)
SIZE_SPLIT = float(np.sqrt(SIZE_FRACTION["small"] * SIZE_FRACTION["large"]))  # box side / cell side
WINDOW_MARGIN = (2.0, 0.25)  # pixels + fraction of the shape's extent kept around its solid part
# Ideal shape moments (see read): third central moment of y / area^1.5 for an apex-up triangle
# with base = height, and mean Re((x+iy)^4) / area^2 for a diamond (a square gives minus that).
TRIANGLE_SKEW = -0.0210
DIAMOND_HARMONIC = 1 / 60
SHAPE_PROTOTYPES = {  # (skew, harmonic) after dividing by the two constants above
    "circle": (0.0, 0.0),
    "square": (0.0, -1.0),
    "triangle": (1.0, 0.11),
    "diamond": (0.0, 1.0),
}


def to_uint8_images(images) -> np.ndarray | list[np.ndarray]:
    """uint8 [N,H,W,3] from a float tensor / array [N,3,H,W] in [-1,1] or a uint8 array [N,H,W,3];
    a list (PIL images or arrays, sizes may differ) gives a list of uint8 [H,W,3]."""
    if hasattr(images, "detach"):  # torch tensor
        images = images.detach().float().cpu().numpy()
    if isinstance(images, np.ndarray):
        if images.ndim == 3:
            images = images[None]
        if images.dtype == np.uint8:
            return images
        if images.shape[1] in (1, 3) and images.shape[-1] not in (1, 3):  # NCHW
            images = images.transpose(0, 2, 3, 1)
        if images.shape[-1] == 1:
            images = np.repeat(images, 3, axis=-1)
        return np.clip(np.rint((images + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return [np.asarray(im.convert("RGB")) if isinstance(im, Image.Image) else to_uint8_images(im)[0]
            for im in images]


def _background(img: np.ndarray) -> np.ndarray:
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]).astype(np.float32)
    return np.median(border, axis=0)


def _classify_color(pixels: np.ndarray, bg: np.ndarray) -> int:
    """Palette index whose background-to-colour segment lies closest to ``pixels`` (median)."""
    target = np.median(pixels, axis=0) - bg
    dirs = PALETTE - bg
    t = np.clip(dirs @ target / np.maximum((dirs * dirs).sum(1), 1e-6), 0.0, 1.0)
    residual = np.linalg.norm(target[None] - t[:, None] * dirs, axis=1)
    return int(np.argmin(residual))


def _window(alpha: np.ndarray) -> tuple[slice, slice]:
    """Box around the solid part of the shape (coverage > 0.5), widened to keep soft edges."""
    ys, xs = np.nonzero(alpha > 0.5)
    if len(ys) == 0:
        ys, xs = np.nonzero(alpha >= alpha.max() * 0.5)
    extent = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
    m = int(np.ceil(WINDOW_MARGIN[0] + WINDOW_MARGIN[1] * extent))
    h, w = alpha.shape
    return slice(max(ys.min() - m, 0), min(ys.max() + m + 1, h)), slice(max(xs.min() - m, 0), min(xs.max() + m + 1, w))


def _shape(skew: float, square_vs_diamond: float) -> str:
    """Nearest prototype in the normalised (vertical skew, 4-fold harmonic) feature plane."""
    point = np.array([skew, square_vs_diamond])
    names = list(SHAPE_PROTOTYPES)
    return names[int(np.argmin([np.sum((point - p) ** 2) for p in SHAPE_PROTOTYPES.values()]))]


def read(image) -> dict:
    """Predicted attributes of one image as a dict; None where unreadable (e.g. a blank image).

    ``image``: PIL, uint8 [H,W,3], or float [3,H,W] in [-1,1]. Also returns ``features`` (``skew``, ``harmonic``, ``side``) for inspection.
    """
    if isinstance(image, Image.Image):
        image = [image]
    img = to_uint8_images(image)[0].astype(np.float32)
    h, w = img.shape[:2]
    bg = _background(img)
    dist = np.linalg.norm(img - bg, axis=-1)
    peak = dist.max()
    if peak < MIN_CONTRAST:
        return dict.fromkeys(ATTRIBUTES)
    k = _classify_color(img[dist >= 0.75 * peak], bg)
    color = list(COLORS)[k]
    direction = PALETTE[k] - bg
    alpha = np.clip((img - bg) @ direction / max(float(direction @ direction), 1e-6), 0.0, 1.0)
    rows, cols = _window(alpha)
    a = alpha[rows, cols].astype(np.float64)
    a[a < ALPHA_FLOOR] = 0.0
    area = a.sum()
    if area < 1.0:
        return {"color": color, "shape": None, "position": None, "size": None}

    y, x = np.mgrid[rows, cols].astype(np.float64)
    cy, cx = (a * y).sum() / area, (a * x).sum() / area
    row, col = min(int(cy * 3 / h), 2), min(int(cx * 3 / w), 2)

    side = np.sqrt(a.max(0).sum() * a.max(1).sum()) / (np.sqrt(h * w) / 3)  # box side / cell side

    # Central moments that a blur (any isotropic kernel) leaves unchanged: the third moment of y
    # and the mean of Re((x + iy)^4), a harmonic polynomial. Dividing by powers of the area
    # (also unchanged by blur) makes them scale-free.
    dy, dx = y - cy, x - cx
    skew = (a * dy**3).sum() / area / area**1.5 / TRIANGLE_SKEW
    harmonic = (a * ((dx + 1j * dy) ** 4).real).sum() / area / area**2 / DIAMOND_HARMONIC
    return {
        "color": color,
        "shape": _shape(skew, harmonic),
        "position": POSITIONS[3 * row + col],
        "size": "large" if side > SIZE_SPLIT else "small",
        "features": {"skew": float(skew), "harmonic": float(harmonic), "side": float(side)},
    }


def read_spec(image) -> ShapeSpec | None:
    """:func:`read` as a ShapeSpec, or None when any attribute is unreadable."""
    got = read(image)
    return None if any(got[a] is None for a in ATTRIBUTES) else ShapeSpec(*(got[a] for a in ATTRIBUTES))


def score(images, specs) -> dict:
    """Per-attribute accuracy of the reader against ``specs`` (ShapeSpec or dicts), plus ``all`` and ``n``.

    ``images``: list of PIL images, uint8 [N,H,W,3], or float [N,3,H,W] in [-1,1] (tensor or array).
    """
    arrays = to_uint8_images(images)
    if len(arrays) != len(specs):
        raise ValueError(f"score: {len(arrays)} images but {len(specs)} specs")
    hits = {a: 0 for a in (*ATTRIBUTES, "all")}
    for img, spec in zip(arrays, specs):
        want = spec.to_dict() if isinstance(spec, ShapeSpec) else dict(spec)
        got = read(img)
        right = [got[a] is not None and got[a] == want[a] for a in ATTRIBUTES]
        for a, ok in zip(ATTRIBUTES, right):
            hits[a] += ok
        hits["all"] += all(right)
    n = len(specs)
    return {a: hits[a] / max(n, 1) for a in hits} | {"n": n}


# -- Shapes layouts (issue 21): every object of a class map, read where the map puts it -------------------
LAYOUT_ATTRIBUTES = ("color", "shape", "position")
LAYOUT_PAD = 2  # background pixels put around a cell before reading it, so a shape touching the cell edge
POSITION_TOLERANCE = (1.5, 0.25)  # pixels, fraction of the object's side: how far its centroid may move


def layout_objects(label) -> list[dict]:
    """Objects of a Shapes layout class map [H, W]: one per 3x3 cell holding object pixels (a pixel belongs
    to the cell its centre lies in), with ``cls``, ``color``, ``shape``, ``cell`` (a Shapes position), the
    cell's pixel ``box`` (rows, cols), the object's ``centroid`` (y, x) and ``area`` (pixels)."""
    from t2i.data.layouts import class_attributes

    label = np.asarray(label.detach().cpu() if hasattr(label, "detach") else label).astype(np.int64)
    h, w = label.shape
    rows = np.minimum(((np.arange(h) + 0.5) * 3 / h).astype(int), 2)
    cols = np.minimum(((np.arange(w) + 0.5) * 3 / w).astype(int), 2)
    out = []
    for cell in range(9):
        r, c = divmod(cell, 3)
        ys, xs = np.nonzero(rows == r)[0], np.nonzero(cols == c)[0]
        box = (slice(ys[0], ys[-1] + 1), slice(xs[0], xs[-1] + 1))
        part = label[box]
        ids, counts = np.unique(part[part > 0], return_counts=True)
        if not len(ids):
            continue
        cls = int(ids[np.argmax(counts)])
        attrs = class_attributes(cls)
        if attrs is None:
            continue
        my, mx = np.nonzero(part == cls)
        out.append({"cls": cls, "color": attrs[0], "shape": attrs[1], "cell": POSITIONS[cell], "box": box,
                    "centroid": (float(my.mean() + box[0].start), float(mx.mean() + box[1].start)),
                    "area": int(len(my))})
    return out


def _layout_background(img: np.ndarray, label: np.ndarray) -> np.ndarray:
    """The generated image's background: the median of the pixels the map calls background (white if none)."""
    bg = img[label == 0]
    return np.median(bg, axis=0) if len(bg) >= 8 else np.array([255.0, 255.0, 255.0], dtype=np.float32)


def read_layout(image, label) -> list[dict]:
    """Read every object of ``label`` (a layout class map) from ``image``: per object, the map's ``want``
    (color, shape, cell) and what the image shows there: ``color`` and ``shape`` (:func:`read` on the object's
    cell, padded with the image's background) and ``centroid`` (of the read colour's coverage >= 1/2 in the
    cell); ``right`` per attribute, ``position`` right when that centroid lies within max(1.5 px, 0.25 x the
    object's side) of the map's."""
    img = to_uint8_images([image] if isinstance(image, Image.Image) else image)[0].astype(np.float32)
    label = np.asarray(label.detach().cpu() if hasattr(label, "detach") else label).astype(np.int64)
    if img.shape[:2] != label.shape:
        raise ValueError(f"read_layout: image {img.shape[:2]} and map {label.shape} differ in size")
    bg = _layout_background(img, label)
    results = []
    for obj in layout_objects(label):
        rows, cols = obj["box"]
        crop = img[rows, cols]
        p = LAYOUT_PAD
        padded = np.broadcast_to(bg, (crop.shape[0] + 2 * p, crop.shape[1] + 2 * p, 3)).copy()
        padded[p:-p, p:-p] = crop
        got = read(np.clip(np.rint(padded), 0, 255).astype(np.uint8))
        centroid = None
        if got["color"] is not None:
            d = PALETTE[list(COLORS).index(got["color"])] - bg
            alpha = (crop - bg) @ d / max(float(d @ d), 1e-6)
            ys, xs = np.nonzero(alpha >= 0.5)
            if len(ys):
                centroid = (float(ys.mean() + rows.start), float(xs.mean() + cols.start))
        tol = max(POSITION_TOLERANCE[0], POSITION_TOLERANCE[1] * np.sqrt(obj["area"]))
        right = {"color": got["color"] == obj["color"], "shape": got["shape"] == obj["shape"],
                 "position": centroid is not None and bool(float(np.hypot(centroid[0] - obj["centroid"][0],
                                                                      centroid[1] - obj["centroid"][1])) <= tol)}
        results.append({"want": {k: obj[k] for k in ("color", "shape", "cell")}, "color": got["color"],
                        "shape": got["shape"], "centroid": centroid, "right": right})
    return results


def layout_accuracy(images, specs) -> dict:
    """Layout fidelity of generated ``images`` against their maps: per-attribute accuracy over all objects
    (``color``, ``shape``, ``position``), ``objects`` (all three right, over objects) and ``all`` (every object
    of the image right, over images), with ``n`` images and ``n_objects``.

    ``images``: as :func:`score`. ``specs``: per image a class map [H, W] (array or tensor), a
    :class:`t2i.data.layouts.LayoutSpec` or its dict (rendered to a map at the image's size).
    """
    from t2i.data.layouts import LayoutSpec, render_layout

    arrays = to_uint8_images(images)
    if len(arrays) != len(specs):
        raise ValueError(f"layout_accuracy: {len(arrays)} images but {len(specs)} maps")
    hits = {a: 0 for a in (*LAYOUT_ATTRIBUTES, "objects")}
    n_obj = images_right = 0
    for img, spec in zip(arrays, specs):
        if isinstance(spec, dict):
            spec = LayoutSpec.from_dict(spec)
        label = render_layout(spec, img.shape[0])[1] if isinstance(spec, LayoutSpec) else spec
        objs = read_layout(img, label)
        for o in objs:
            for a in LAYOUT_ATTRIBUTES:
                hits[a] += o["right"][a]
            hits["objects"] += all(o["right"].values())
        n_obj += len(objs)
        images_right += all(all(o["right"].values()) for o in objs)
    n = len(arrays)
    return {a: hits[a] / max(n_obj, 1) for a in hits} | {"all": images_right / max(n, 1), "n": n,
                                                         "n_objects": n_obj}
