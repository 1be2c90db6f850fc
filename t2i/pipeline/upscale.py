"""Super-resolution of generated images with a Real-ESRGAN RRDBNet (after reranking, before writing)."""

from __future__ import annotations

from pathlib import Path

import torch

from t2i.errors import ConfigError

SCALES = (1, 2, 4, 8)


def check_upscale(path=None, scale=None, tile=0, tile_pad=10, prefix: str = "sr.") -> None:
    """One ConfigError for upscaler settings that cannot work (before any model loads)."""
    for key, v in (("tile", tile), ("tile_pad", tile_pad)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f"{prefix}{key}={v} must be an integer >= 0")
    if scale is not None and scale not in SCALES:
        raise ConfigError(f"{prefix}scale={scale} must be 1, 2, 4 or 8 (or null: the weights' own scale)")
    if path and not Path(str(path)).expanduser().is_file():
        raise ConfigError(f"{prefix}ckpt={path}: no such file (a Real-ESRGAN .pth, e.g. RealESRGAN_x4plus.pth, "
                          f"or a `t2i-import realesrgan` output)")


def load_upscaler(path, scale=None, device: torch.device | str = "cpu", prefix: str = "sr."):
    """The RRDBNet of ``path`` (None without one) on ``device``; ConfigError for a missing file or a
    ``scale`` the weights do not have (Real-ESRGAN trains one model per scale: x8 is its own model)."""
    if not path:
        return None
    check_upscale(path, scale, prefix=prefix)
    from t2i.pretrained.realesrgan import load_sr

    model = load_sr(Path(str(path)).expanduser())
    if scale is not None and int(scale) != model.scale:
        raise ConfigError(f"{prefix}scale={scale}, but {prefix}ckpt={path} holds x{model.scale} weights (each "
                          f"Real-ESRGAN model has one scale): set {prefix}scale={model.scale} or null, or pass "
                          f"x{scale} weights")
    return model.to(device).eval()


@torch.no_grad()
def upscale_images(model, pics: torch.Tensor, tile: int = 0, tile_pad: int = 10) -> torch.Tensor:
    """``pics [N, 3, H, W]`` in [0, 1] -> upscaled in [0, 1], one image at a time (bounded memory)."""
    from t2i.models.rrdbnet import upscale

    return torch.cat([upscale(model, p[None], tile=int(tile), tile_pad=int(tile_pad)) for p in pics]).float().clamp(0, 1)
