"""Label maps from a folder, as ``t2i-synthesize`` reads them: one PNG of class ids a file (or a ``labels/``
subfolder, as ``t2i-data shapes_layout`` writes), instance maps matched by stem; a map that does not decode or
holds ids the model does not know is skipped, counted and reported (:class:`LayoutSkipLog`)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from t2i.data.skips import BadSample, DataError
from t2i.errors import ConfigError

log = logging.getLogger("t2i.synthesize")


def map_files(folder, key: str = "maps") -> list[Path]:
    """Label PNGs of ``folder`` (or of its ``labels/`` subfolder), sorted by name."""
    if folder in (None, ""):
        raise ConfigError(f"{key} is not set: give a folder of label-map PNGs (or a shapes_layout split folder)")
    root = Path(str(folder)).expanduser()
    if not root.is_dir():
        raise ConfigError(f"{key}={folder}: no such folder")
    if (root / "labels").is_dir():
        root = root / "labels"
    files = sorted(p for p in root.iterdir() if p.suffix.lower() == ".png" and p.is_file())
    if not files:
        splits = [s for s in ("test", "val", "train") if (root / s / "labels").is_dir()]
        hint = f" (a shapes_layout folder: give a split, e.g. {key}={folder}/{splits[0]})" if splits else ""
        raise ConfigError(f"{key}={folder}: no .png label maps in {root}{hint}")
    return files


def read_map(path: Path, num_classes: int, size: tuple[int, int] | None = None) -> torch.Tensor:
    """One label map as long [H, W] (NEAREST-resized to ``size``); raises BadSample when it does not decode
    or holds class ids outside ``0..num_classes-1``."""
    from t2i.data.layouts import LABEL_OUT_OF_RANGE, read_id_map, resize_nearest

    arr = read_id_map(path)
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= num_classes:
        raise BadSample(LABEL_OUT_OF_RANGE, str(path), f"class ids {lo}..{hi} in a {8 * arr.dtype.itemsize}-bit "
                                                       f"map, the model knows 0..{num_classes - 1}")
    if size is not None and arr.shape != tuple(size):
        arr = resize_nearest(arr, size[1], size[0])
    return torch.from_numpy(arr.astype(np.int64))


def read_instance(folder, stem: str, size: tuple[int, int] | None) -> torch.Tensor:
    from t2i.data.layouts import MISSING_INSTANCE, read_id_map, resize_nearest

    path = Path(str(folder)).expanduser() / f"{stem}.png"
    if not path.is_file():
        raise BadSample(MISSING_INSTANCE, str(path), "no instance map with this stem")
    arr = read_id_map(path)
    if size is not None and arr.shape != tuple(size):
        arr = resize_nearest(arr, size[1], size[0])
    return torch.from_numpy(arr.astype(np.int64))


def load_maps(cfg_maps, num_classes: int, size, instances=None, limit=None, max_bad_fraction: float = 0.01,
              key: str = "maps", fraction_key: str = "max_bad_fraction"):
    """(stems, labels [N, H, W], instances [N, H, W] or None, SkipLog) from a maps folder; bad maps counted (with
    what is wrong with each); past ``max_bad_fraction`` one error whose hint names ``fraction_key``."""
    from t2i.data.layouts import LayoutSkipLog

    files = map_files(cfg_maps, key)
    if limit:
        files = files[: int(limit)]
    slog = LayoutSkipLog(max_bad_fraction, name=f"{key} {cfg_maps}", key=fraction_key)
    stems, labels, insts = [], [], []
    for f in files:
        try:
            lab = read_map(f, num_classes, size)
            inst = read_instance(instances, f.stem, tuple(lab.shape)) if instances else None
        except BadSample as e:
            slog.skip(e.reason, e.where, e.detail)
            continue
        if labels and lab.shape != labels[0].shape:
            from t2i.data.layouts import SIZE_MISMATCH

            slog.skip(SIZE_MISMATCH, str(f))
            continue
        slog.ok()
        stems.append(f.stem)
        labels.append(lab)
        insts.append(inst)
    if slog.n_bad:
        log.warning(slog.summary())
    slog.check()
    if not labels:
        raise DataError(f"{key}={cfg_maps}: no usable label maps")
    return stems, torch.stack(labels), (torch.stack(insts) if instances else None), slog
