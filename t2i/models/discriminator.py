"""PatchGAN discriminator (pix2pix ``NLayerDiscriminator``) with taming-transformers' layout and names.

``main`` is one ``nn.Sequential``: conv(4, s2) + LeakyReLU, then ``n_layers - 1`` blocks of conv(4, s2) +
norm + LeakyReLU, one conv(4, s1) + norm + LeakyReLU, and a conv(4, s1) to one logit per patch, so taming
keys (``loss.discriminator.main.N.*``) load after stripping the prefix. 256 px with ``n_layers=3`` gives a
30x30 grid of logits.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class ActNorm(nn.Module):
    """Per-channel affine ``scale * (x + loc)`` whose parameters are set, on the first training forward,
    so that this batch comes out with zero mean and unit (unbiased) variance per channel (Glow). ``initialized`` is a
    buffer, so a loaded checkpoint is not re-initialised. Under DDP the statistics are those of the global
    batch (all-reduced), keeping ranks identical."""

    def __init__(self, num_features: int):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        x = x.float()
        n = x.numel() // x.shape[1]
        moments = torch.stack([x.mean(dim=(0, 2, 3)), x.pow(2).mean(dim=(0, 2, 3))])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(moments)
            moments /= dist.get_world_size()
            n *= dist.get_world_size()
        mean, sq = moments
        std = ((sq - mean.pow(2)).clamp_min(0) * n / max(n - 1, 1)).sqrt()  # unbiased, as taming
        self.loc.copy_(-mean.view_as(self.loc))
        self.scale.copy_((1.0 / (std + 1e-6)).view_as(self.scale))
        self.initialized.fill_(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.initialized.item() == 0:
            self.initialize(x)
        return self.scale * (x + self.loc)


def weights_init(m: nn.Module) -> None:
    """DCGAN init as in taming: conv weights N(0, 0.02); BatchNorm weight N(1, 0.02), bias 0."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.constant_(m.bias, 0.0)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: images ``[B, input_nc, H, W]`` -> logits ``[B, 1, h, w]`` (one per receptive-field patch).

    ``norm="batch"`` (BatchNorm2d, convs before it without bias) or ``"actnorm"`` (convs with bias).
    """

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        if norm not in ("batch", "actnorm"):
            raise ValueError(f"NLayerDiscriminator: norm must be 'batch' or 'actnorm', got {norm!r}")
        if n_layers < 1:
            raise ValueError(f"NLayerDiscriminator: n_layers must be >= 1, got {n_layers}")
        norm_layer = nn.BatchNorm2d if norm == "batch" else ActNorm
        bias = norm != "batch"  # BatchNorm has its own shift
        layers: list[nn.Module] = [nn.Conv2d(input_nc, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=bias),
                       norm_layer(ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(weights_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)
