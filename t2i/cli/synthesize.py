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

import hydra
import torch
from omegaconf import DictConfig
from torchvision.utils import save_image

from t2i import checks
from t2i.cli.common import clear_errors
from t2i.data.layouts.maps import load_maps, map_files, read_instance, read_map  # noqa: F401 (tests read them)
from t2i.data.prompts import check_output_folder
from t2i.devices import pick_device
from t2i.errors import ConfigError
from t2i.pipeline.spade import colorize_map, load_spade

# typed keys, checked before the checkpoint loads (the maps folder and style are read after it: they need its size)
KEYS = {
    "maps": checks.folder(what="folder of label-map PNGs"),
    "instances": checks.folder(optional=True, what="folder of instance-map PNGs with the maps' stems"),
    "limit": checks.count(optional=True), "max_bad_fraction": checks.fraction(),
    "seed": checks.integer(), "progress": checks.boolean(), "output": checks.output_folder(),
}


def check_style(style) -> None:
    """``null``, ``random`` or a folder of style images."""
    if style is None or str(style).lower() in ("null", "none", "", "random"):
        return
    checks.folder(what="folder of style images (or style=random / style=null)")("style", style)


def run(cfg: DictConfig) -> dict:
    from t2i.pipeline.spade import Synthesizer

    if not cfg.ckpt:
        raise ConfigError("ckpt is not set: give a SPADE checkpoint (`t2i-train experiment=shapes_spade`)")
    for k in ("num_styles", "batch_size", "grid_maps"):
        v = cfg[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{k}={v} must be an integer >= 1")
    checks.check_keys(cfg, KEYS)
    check_style(cfg.style)
    style = cfg.style
    if str(style).lower() in ("null", "none", ""):  # Hydra's null, and None as Python callers write it
        style = None
    out = check_output_folder(cfg.output)
    device = pick_device(str(cfg.device))
    map_files(cfg.maps)  # a bad folder fails before the model loads
    synth = Synthesizer(load_spade(cfg.ckpt, device), device)
    stems, labels, insts, slog = load_maps(cfg.maps, synth.num_classes, synth.size, cfg.get("instances"),
                                           cfg.get("limit"), float(cfg.max_bad_fraction))
    result = synth(labels, style=style, num_styles=int(cfg.num_styles), seed=int(cfg.seed), instances=insts,
                   batch_size=int(cfg.batch_size), progress=bool(cfg.progress))
    images, styles = result.pixels, result.styles
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
    cells = torch.cat([colorize_map(labels[:g], synth.num_classes)[:, None], images[:g]], 1)
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
