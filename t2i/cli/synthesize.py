"""t2i-synthesize: label maps -> images with a trained SPADE / GauGAN checkpoint (issue 21).

    t2i-synthesize ckpt=<run>/checkpoints/best.ckpt maps=data/shapes_layout_32/test style=random num_styles=4
    t2i-synthesize ckpt=... maps=my_maps/ style=photos/ num_styles=3 output=synth/

``maps``: a folder of label PNGs (uint8 / uint16 class ids, one map a file), or a folder holding ``labels/``
(a ``t2i-data shapes_layout`` split, e.g. ``data/shapes_layout_32/test``); ``instances`` (optional): instance
maps with the same stems, for a model trained with ``has_instances``. Maps of another size than the model's
are resized with NEAREST. ``style``: ``null`` (one image per map: the style prior's mean, or the map alone for a
model without a style encoder), ``random`` (``num_styles`` images per map, styles drawn from N(0, I) with seeds
``seed + k``) or a folder of style images (the first ``num_styles``, sorted by name; each map gets each style).
A map that does not decode or holds class ids the model does not know is skipped, counted and reported; past
``max_bad_fraction`` the run stops.

Output (``output``, default the Hydra run folder): ``<map>_s<k>.png`` per image, ``grid.png`` (a row per map,
the first ``grid_maps``: map | style 0 | style 1 | ...) and ``synthesize.jsonl`` (one line per image: map,
file, style, style index, seed).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from torchvision.utils import save_image

from t2i.cli.common import clear_errors
from t2i.data.skips import BadSample, DataError
from t2i.devices import pick_device
from t2i.errors import ConfigError
from t2i.pipeline.spade import (  # noqa: F401 (t2i-eval's SPADE protocol reads them here)
    colorize_map,
    load_spade,
    model_size,
    module_class,
    style_images,
    synthesize,
)

log = logging.getLogger("t2i.synthesize")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# -- maps ---------------------------------------------------------------------------------------------------
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


def run(cfg: DictConfig) -> dict:
    if not cfg.ckpt:
        raise ConfigError("ckpt is not set: give a SPADE checkpoint (`t2i-train experiment=shapes_spade`)")
    for k in ("num_styles", "batch_size"):
        v = cfg[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{k}={v} must be an integer >= 1")
    style_cfg = cfg.style
    if str(style_cfg).lower() in ("null", "none", ""):  # Hydra's null, and None as Python callers write it
        style_cfg = None
    device = pick_device(str(cfg.device))
    map_files(cfg.maps)  # a bad folder fails before the model loads
    module = load_spade(cfg.ckpt, device)
    size = model_size(module)
    stems, labels, insts, slog = load_maps(cfg.maps, int(module.num_classes), size, cfg.get("instances"),
                                           cfg.get("limit"), float(cfg.max_bad_fraction))
    if getattr(module, "use_instance", False) and insts is None:
        raise ConfigError("this model was trained with instance maps (has_instances): give instances=<folder of "
                          "instance PNGs with the maps' stems>")
    if style_cfg is None or style_cfg == "random":
        style = style_cfg
    else:
        style = style_images(style_cfg, int(cfg.num_styles), tuple(labels.shape[-2:]))
    images, styles = synthesize(module, labels, insts, style, int(cfg.num_styles), int(cfg.seed),
                                int(cfg.batch_size), device, bool(cfg.progress))
    out = Path(str(cfg.output)).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, stem in enumerate(stems):
        for k, (kind, what) in enumerate(styles):
            name = f"{stem}_s{k:02d}.png"
            save_image(images[i, k], out / name, value_range=(-1, 1), normalize=True)
            rows.append({"map": stem, "file": name, "style": kind, "style_index": k,
                         "seed": what if kind == "random" else None, "style_image": what if kind == "image" else None})
    with open(out / "synthesize.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    from t2i.viz import sample_grid

    g = min(int(cfg.grid_maps), len(stems))
    cells = torch.cat([colorize_map(labels[:g], int(module.num_classes))[:, None], images[:g]], 1)
    save_image(sample_grid(cells.flatten(0, 1), nrow=cells.shape[1], value_range=(-1.0, 1.0)), out / "grid.png")
    print(f"t2i-synthesize: {len(stems)} maps x {len(styles)} style(s) -> {out} (grid.png, synthesize.jsonl)"
          + (f"; {slog.n_bad} map(s) skipped" if slog.n_bad else ""))
    return {"output": out, "n_maps": len(stems), "n_styles": len(styles), "skipped": slog.to_dict(),
            "images": images, "stems": stems}


@hydra.main(version_base="1.3", config_path="../conf", config_name="synthesize")
@clear_errors
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
