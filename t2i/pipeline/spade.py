"""``Synthesizer``: a SPADE / GauGAN checkpoint loaded once, called on label maps -> images per style.

    from t2i import Synthesizer
    synth = Synthesizer.from_checkpoint("runs/shapes_spade/checkpoints/best.ckpt")
    out = synth(label_maps, style="random", num_styles=4, seed=0)   # label_maps: LongTensor [N, H, W] or PIL maps
    out.images[0][2].save("map0_style2.png")                          # PIL, map i, style k

``t2i-synthesize`` is this class behind a config (it reads the maps from a folder, counting bad ones). Styles:
``None`` (one image per map: the style prior's mean, or the map alone for a model without a style encoder),
``"random"`` (style ``k`` drawn from N(0, I) with the seed ``seed + k``, the same draw for every map) or style
images ``[K, 3, H, W]`` in [-1, 1] (each map gets each style).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from t2i.data.skips import BadSample
from t2i.devices import pick_device
from t2i.errors import ConfigError, T2IError, reason

log = logging.getLogger("t2i.synthesize")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


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
        raise T2IError(f"{key}={path} cannot be read ({reason(e)})") from None
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


@dataclass
class Synthesis:
    """``images[i][k]``: map ``i`` in style ``k`` (PIL); ``pixels [N, K, 3, H, W]`` in [-1, 1]; ``styles``:
    per style ``(kind, seed or file)``."""

    images: list
    pixels: torch.Tensor
    styles: list


def label_tensor(maps, num_classes: int, size: tuple[int, int] | None = None) -> torch.Tensor:
    """``[N, H, W]`` class ids from a LongTensor ``[N, H, W]`` / ``[H, W]`` or PIL maps (modes L, I;16, I, or P
    read by palette index); one ConfigError for ids the model does not know or maps of different sizes."""
    from PIL import Image

    if isinstance(maps, Image.Image):
        maps = [maps]
    if not isinstance(maps, torch.Tensor):
        arrs = []
        for i, m in enumerate(maps):
            if m.mode not in ("L", "P", "I;16", "I"):
                raise ConfigError(f"label_maps[{i}] is a {m.mode} image; a label map holds one class id per pixel "
                                  f"(mode L, P, I;16 or I)")
            arrs.append(torch.from_numpy(np.asarray(m).astype(np.int64)))
        if len({tuple(a.shape) for a in arrs}) > 1:
            raise ConfigError(f"label_maps have different sizes ({sorted({tuple(a.shape) for a in arrs})}); give "
                              f"maps of one size")
        maps = torch.stack(arrs)
    maps = maps[None] if maps.dim() == 2 else maps
    if maps.dim() != 3 or maps.dtype.is_floating_point:
        raise ConfigError(f"label_maps must be integer class ids [N, H, W], got {list(maps.shape)} {maps.dtype}")
    lo, hi = int(maps.min()), int(maps.max())
    if lo < 0 or hi >= num_classes:
        raise ConfigError(f"label_maps hold class ids {lo}..{hi}; the model knows 0..{num_classes - 1}")
    if size is not None and tuple(maps.shape[-2:]) != tuple(size):
        maps = torch.nn.functional.interpolate(maps[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()
    return maps.long()


class Synthesizer:
    """A SPADE module with its device; see the module docstring."""

    def __init__(self, module, device: torch.device | str = "cpu"):
        self.module, self.device = module, torch.device(device)

    @classmethod
    def from_checkpoint(cls, path, device="auto") -> Synthesizer:
        """A ``t2i-train experiment=*_spade`` checkpoint in eval mode on ``device`` (auto | cpu | cuda[:N])."""

        device = pick_device(device)
        return cls(load_spade(path, device, key="path"), device)

    @property
    def num_classes(self) -> int:
        return int(self.module.num_classes)

    @property
    def size(self) -> tuple[int, int] | None:
        return model_size(self.module)

    def __call__(self, label_maps, style=None, num_styles: int = 1, seed: int = 0, instances=None,
                 batch_size: int = 8, progress: bool = False) -> Synthesis:
        """Images for every map and style. ``style``: None, ``"random"``, or style images ``[K, 3, H, W]`` in
        [-1, 1] (or a folder of images: the first ``num_styles``); ``instances``: instance maps for a model
        trained with ``has_instances``."""
        from t2i.pipeline.text_to_image import check_count, to_pil

        check_count("num_styles", num_styles)
        check_count("batch_size", batch_size)
        labels = label_tensor(label_maps, self.num_classes, self.size)
        if getattr(self.module, "use_instance", False) and instances is None:
            raise ConfigError("this model was trained with instance maps (has_instances): give instances=<instance "
                              "maps with the label maps' shape>")
        if isinstance(style, (str, Path)) and str(style) != "random":
            style = style_images(style, int(num_styles), tuple(labels.shape[-2:]))
        elif isinstance(style, torch.Tensor):
            style = ([f"style[{k}]" for k in range(len(style))], style)
        elif style is not None and style != "random":
            raise ConfigError(f"style={style!r}: use None, 'random', style images [K, 3, H, W] or a folder")
        pixels, styles = synthesize(self.module, labels, instances, style, int(num_styles), int(seed),
                                    int(batch_size), self.device, progress)
        images = [to_pil((row + 1) / 2) for row in pixels.clamp(-1, 1)]
        return Synthesis(images, pixels, styles)
