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
from tqdm.auto import tqdm

from t2i.cli.common import clear_errors
from t2i.cli.tokenize import pick_device
from t2i.data.skips import BadSample, DataError
from t2i.errors import ConfigError, T2IError

log = logging.getLogger("t2i.synthesize")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# -- the model ------------------------------------------------------------------------------------------
def module_class():
    """The LightningModule a SPADE checkpoint rebuilds (tests swap in a stand-in)."""
    from t2i.lit.spade import SPADEModule

    return SPADEModule


def load_spade(path, device: torch.device, key: str = "ckpt"):
    """``SPADEModule(**ckpt["hyper_parameters"])`` + its state dict, in eval mode on ``device``."""
    p = Path(str(path)).expanduser() if path else None
    if p is None or not p.is_file():
        raise ConfigError(f"{key}={path}: no such file (a SPADE .ckpt from `t2i-train experiment=*_spade`)")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise T2IError(f"{key}={path} cannot be read ({type(e).__name__}: {e})") from None
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hp, dict) or "state_dict" not in ckpt or "num_classes" not in (hp.get("model") or {}):
        raise T2IError(f"{key}={path} is not a SPADE checkpoint (train one with experiment=*_spade)")
    module = module_class()(**hp)
    module.load_state_dict(ckpt["state_dict"])
    return module.to(device).eval()


def model_size(module) -> tuple[int, int] | None:
    """(H, W) the module's generator makes, when it says."""
    g = module.sampling_generator() if hasattr(module, "sampling_generator") else getattr(module, "generator", None)
    size = getattr(g, "size", None)
    return tuple(int(s) for s in size) if size is not None else None


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
    if size is not None and arr.shape != tuple(size):
        arr = resize_nearest(arr, size[1], size[0])
    if arr.min() < 0 or arr.max() >= num_classes:
        raise BadSample(LABEL_OUT_OF_RANGE, str(path),
                        f"class ids {arr.min()}..{arr.max()}, the model knows 0..{num_classes - 1}")
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
              key: str = "maps"):
    """(stems, labels [N, H, W], instances [N, H, W] or None, SkipLog) from a maps folder; bad maps counted."""
    from t2i.data.layouts import LayoutSkipLog

    files = map_files(cfg_maps, key)
    if limit:
        files = files[: int(limit)]
    slog = LayoutSkipLog(max_bad_fraction, name=f"{key} {cfg_maps}")
    stems, labels, insts = [], [], []
    for f in files:
        try:
            lab = read_map(f, num_classes, size)
            inst = read_instance(instances, f.stem, tuple(lab.shape)) if instances else None
        except BadSample as e:
            slog.skip(e.reason, e.where)
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


def colorize_map(label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Label maps [B, H, W] -> pictures [B, 3, H, W] in [-1, 1]: Shapes layouts (25 classes) in their own
    colours on white, other maps with a fixed palette (class 0 black)."""
    from t2i.data.layouts import NUM_LAYOUT_CLASSES
    from t2i.data.shapes import BACKGROUND, COLORS, SHAPES

    if num_classes == NUM_LAYOUT_CLASSES:
        rgb = [BACKGROUND] + [c for c in COLORS.values() for _ in SHAPES]
        pal = torch.tensor(rgb, dtype=torch.float32) / 127.5 - 1
    else:
        pal = torch.rand(num_classes, 3, generator=torch.Generator().manual_seed(7)) * 1.6 - 0.6
        pal[0] = -1.0
    return pal.to(label.device)[label.long()].permute(0, 3, 1, 2)


def style_images(folder, n: int, size: tuple[int, int], key: str = "style") -> tuple[list[str], torch.Tensor]:
    """The first ``n`` images of ``folder`` (sorted) as [n, 3, H, W] in [-1, 1] (resized to cover, centre crop)."""
    from t2i.data.base import decode_image
    from t2i.data.layouts import fit_pair

    root = Path(str(folder)).expanduser()
    if not root.is_dir():
        raise ConfigError(f"{key}={folder}: use null, random or a folder of style images")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())[:n]
    names, out = [], []
    for f in files:
        try:
            img = decode_image(f.read_bytes(), str(f))
        except BadSample as e:
            log.warning("style image skipped: %s", e)
            continue
        pixels, _ = fit_pair(img, [], size[0], size[1])
        out.append(torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1)
        names.append(str(f))
    if not out:
        raise ConfigError(f"{key}={folder}: no readable images ({', '.join(IMAGE_SUFFIXES)})")
    return names, torch.stack(out)


# -- running ------------------------------------------------------------------------------------------------
def synthesize(module, labels: torch.Tensor, instances: torch.Tensor | None, style, num_styles: int, seed: int,
               batch_size: int, device: torch.device, progress: bool = False):
    """Images [N, K, 3, H, W] in [-1, 1] for N maps and K styles, plus per style (kind, seed or file).

    ``style``: None, ``"random"`` (style k from a generator seeded ``seed + k``, the same draw for every map:
    maps go one at a time) or (names, images [K, 3, H, W])."""
    n = labels.shape[0]
    if style is None:
        styles = [("prior", None)]
    elif isinstance(style, str):
        styles = [("random", seed + k) for k in range(num_styles)]
    else:
        styles = [("image", name) for name in style[0]]
    out = torch.empty(n, len(styles), 3, *labels.shape[-2:])
    bar = tqdm(total=n * len(styles), desc="synthesize", disable=not progress)
    for k, (kind, what) in enumerate(styles):
        # random: one map a call, each with a generator seeded seed + k, so style k is the same draw for every
        # map (the grid's columns are styles) and no result depends on batch_size
        step = 1 if kind == "random" else batch_size
        for a in range(0, n, step):
            lab = labels[a:a + step].to(device)
            inst = instances[a:a + step].to(device) if instances is not None else None
            gen = torch.Generator(device=device).manual_seed(int(what)) if kind == "random" else None
            if kind == "prior":
                s = None
            elif kind == "random":
                s = "random"
            else:
                s = style[1][k:k + 1].expand(len(lab), -1, -1, -1).to(device)
            with torch.no_grad():
                out[a:a + len(lab), k] = module.generate(lab, instance=inst, style=s, generator=gen).float().cpu()
            bar.update(len(lab))
    bar.close()
    return out, styles


def run(cfg: DictConfig) -> dict:
    if not cfg.ckpt:
        raise ConfigError("ckpt is not set: give a SPADE checkpoint (`t2i-train experiment=shapes_spade`)")
    for k in ("num_styles", "batch_size"):
        v = cfg[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{k}={v} must be an integer >= 1")
    style_cfg = cfg.style
    if style_cfg in ("null", "none", ""):
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
