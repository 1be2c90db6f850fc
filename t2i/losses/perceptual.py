"""LPIPS perceptual distance (torchmetrics' network, VGG16 weights from a local file, never downloaded).

torchmetrics ships the LPIPS linear-layer weights; the VGG16 ImageNet backbone is the file
torchvision would download: ``vgg16-397923af.pth``. We read it from ``vgg_path`` or from the
standard torch cache (``$TORCH_HOME/hub/checkpoints/``) and fail with one message naming the file
when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from t2i.errors import T2IError

VGG16_FILE = "vgg16-397923af.pth"
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILE}"


def torch_cache_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def find_vgg16(vgg_path: str | None = None) -> Path:
    """The VGG16 weight file: ``vgg_path`` if given, else the torch cache; a clear error otherwise."""
    path = Path(vgg_path).expanduser() if vgg_path else torch_cache_dir() / VGG16_FILE
    if not path.is_file():
        where = f"vgg_path={vgg_path}" if vgg_path else f"{path} (the torch cache, TORCH_HOME={os.environ.get('TORCH_HOME', '~/.cache/torch')})"
        raise T2IError(
            f"LPIPS needs the VGG16 ImageNet weights {VGG16_FILE}, not found at {where}. On a connected machine "
            f"download {VGG16_URL} and put it there or pass model.loss.vgg_path=<file>; or train without the "
            "perceptual loss: model.loss.perceptual_weight=0"
        )
    return path


class LPIPS(nn.Module):
    """LPIPS (VGG variant) as a frozen loss module: ``forward(x, y)`` on images in [-1, 1] -> [B]."""

    def __init__(self, vgg_path: str | None = None):
        super().__init__()
        from torchmetrics.functional.image.lpips import _LPIPS

        # linear layers: torchmetrics' bundled file; backbone: random, then our weights (no download)
        self.net = _LPIPS(pretrained=True, net="vgg", pnet_rand=True, pnet_tune=False)
        state = torch.load(find_vgg16(vgg_path), map_location="cpu", weights_only=True)
        load_vgg_features(self.net.net, state, source=str(vgg_path or VGG16_FILE))
        self.eval().requires_grad_(False)

    def train(self, mode: bool = True):  # always frozen, dropout off
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(x, y, normalize=False).flatten()


def load_vgg_features(net: nn.Module, state: dict, source: str) -> None:
    """Copy torchvision ``vgg16`` ``features.<i>.*`` weights into torchmetrics' sliced VGG16 (``slice<k>.<i>.*``)."""
    own = net.state_dict()
    mapped = {}
    for name in own:
        _, idx, param = name.split(".", 2)
        key = f"features.{idx}.{param}"
        if key not in state:
            raise T2IError(f"{source}: not a torchvision VGG16 state dict (no {key})")
        mapped[name] = state[key]
    net.load_state_dict(mapped)
