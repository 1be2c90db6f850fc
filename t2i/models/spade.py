"""SPADE / GauGAN (Park et al., CVPR 2019): semantic image synthesis from a label map.

* :class:`SPADE`: ``norm(x) * (1 + gamma(m)) + beta(m)``, ``norm`` parameter-free (instance or batch norm;
  Lightning's ``trainer.sync_batchnorm`` turns the batch norm into a synchronised one under DDP),
  ``gamma``/``beta`` per pixel from a small conv net (shared conv + ReLU, then one conv each) on the label
  map resized (nearest) to ``x``.
* :class:`SPADEResBlock`: SPADE -> LeakyReLU(0.2) -> conv, twice, plus a shortcut (SPADE -> 1x1 conv without
  bias) learned when the channel count changes; spectral norm on the convolutions optional.
* :class:`SPADEGenerator`: starts from the label map downsampled to a small grid and a 3x3 conv, or, with a
  style encoder, from a style vector ``z`` through a linear layer; upsampling stages (nearest x2) follow the
  output size: ``log2(height / latent_size)``. 5, 6 and 7 stages are the paper's ``normal``, ``more`` and
  ``most`` layouts; fewer (small images) keep the last stages' channel halving.
* :class:`MultiscaleDiscriminator`: ``num_d`` PatchGANs (our :class:`NLayerDiscriminator`, instance norm and
  spectral norm as the paper's ``spectralinstance``) on the image + map, each scale average-pooled by 2;
  returns every layer's features (feature matching) with the logits last.
* :class:`StyleEncoder`: image -> ``(mu, logvar)`` of the style vector (stride-2 3x3 convs down to 4 px).

Differences from NVlabs/SPADE, on purpose: the number of stages follows the configured size rather than
three named layouts; the encoder reads images at their own size (the reference resizes every image to
256x256 first), so its last grid is ``4 x 4 * aspect``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from t2i.errors import ConfigError
from t2i.models.discriminator import NLayerDiscriminator

PARAM_FREE_NORMS = ("instance", "batch")


def instance_edges(instance: torch.Tensor) -> torch.Tensor:
    """``[B, H, W]`` instance ids -> ``[B, 1, H, W]`` float edge map: 1 where a pixel's 4-neighbour has another id."""
    t = instance
    edge = torch.zeros_like(t, dtype=torch.bool)
    dx = t[:, :, 1:] != t[:, :, :-1]
    dy = t[:, 1:, :] != t[:, :-1, :]
    edge[:, :, 1:] |= dx
    edge[:, :, :-1] |= dx
    edge[:, 1:, :] |= dy
    edge[:, :-1, :] |= dy
    return edge[:, None].float()


def label_input(label: torch.Tensor, num_classes: int, instance: torch.Tensor | None = None,
                use_instance: bool = False) -> torch.Tensor:
    """The network input: ``one_hot(label)`` ``[B, num_classes, H, W]``, plus the instance-edge channel when
    ``use_instance`` (zeros when no instance map is given)."""
    if label.dim() != 3:
        raise ValueError(f"label maps are [B, H, W] class ids, got shape {tuple(label.shape)}")
    if label.numel() and (int(label.min()) < 0 or int(label.max()) >= num_classes):
        raise ValueError(f"label ids must lie in 0..{num_classes - 1} (num_classes={num_classes}), "
                         f"got {int(label.min())}..{int(label.max())}")
    x = F.one_hot(label.long(), num_classes).permute(0, 3, 1, 2).float()
    if use_instance:
        edges = instance_edges(instance) if instance is not None else x.new_zeros(x.shape[0], 1, *x.shape[2:])
        x = torch.cat([x, edges.to(x)], 1)
    return x


def _sn(module: nn.Module, on: bool) -> nn.Module:
    return spectral_norm(module) if on else module


def param_free_norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=False)
    if kind == "batch":
        return nn.BatchNorm2d(channels, affine=False)
    raise ConfigError(f"model.model.norm={kind!r}: SPADE's parameter-free norm is one of {', '.join(PARAM_FREE_NORMS)}")


class SPADE(nn.Module):
    """Spatially-adaptive denormalisation: ``norm(x) * (1 + gamma(m)) + beta(m)``."""

    def __init__(self, channels: int, label_nc: int, hidden: int = 128, kernel_size: int = 3, norm: str = "batch"):
        super().__init__()
        self.norm = param_free_norm(norm, channels)
        pad = kernel_size // 2
        self.shared = nn.Sequential(nn.Conv2d(label_nc, hidden, kernel_size, padding=pad), nn.ReLU())
        self.gamma = nn.Conv2d(hidden, channels, kernel_size, padding=pad)
        self.beta = nn.Conv2d(hidden, channels, kernel_size, padding=pad)

    def forward(self, x: torch.Tensor, segmap: torch.Tensor) -> torch.Tensor:
        normalized = self.norm(x)
        h = self.shared(F.interpolate(segmap, size=x.shape[2:], mode="nearest"))
        return normalized * (1 + self.gamma(h)) + self.beta(h)


class SPADEResBlock(nn.Module):
    """Two SPADE -> LeakyReLU -> 3x3 conv steps (middle width ``min(fin, fout)``) plus the shortcut."""

    def __init__(self, fin: int, fout: int, label_nc: int, spectral: bool = True, norm: str = "batch",
                 hidden: int = 128, kernel_size: int = 3):
        super().__init__()
        mid = min(fin, fout)
        self.learned_shortcut = fin != fout
        self.conv_0 = _sn(nn.Conv2d(fin, mid, 3, padding=1), spectral)
        self.conv_1 = _sn(nn.Conv2d(mid, fout, 3, padding=1), spectral)
        self.norm_0 = SPADE(fin, label_nc, hidden, kernel_size, norm)
        self.norm_1 = SPADE(mid, label_nc, hidden, kernel_size, norm)
        if self.learned_shortcut:
            self.conv_s = _sn(nn.Conv2d(fin, fout, 1, bias=False), spectral)
            self.norm_s = SPADE(fin, label_nc, hidden, kernel_size, norm)

    def forward(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        shortcut = self.conv_s(self.norm_s(x, seg)) if self.learned_shortcut else x
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, seg), 0.2))
        dx = self.conv_1(F.leaky_relu(self.norm_1(dx, seg), 0.2))
        return shortcut + dx


def output_size(image_size, aspect_ratio: float = 1.0) -> tuple[int, int]:
    """``(H, W)``: ``image_size`` as ``[H, W]``, or an int height with ``W = round(H * aspect_ratio)``, as the
    label-map data configs define them (Cityscapes: 256 and 2.0 -> 256 x 512, the paper's size)."""
    if isinstance(image_size, (list, tuple)):
        h, w = (int(v) for v in image_size)
        return h, w
    h = int(image_size)
    return h, int(round(h * float(aspect_ratio)))


def block_layout(n_up: int) -> list[tuple[bool, float, float]]:
    """``(upsample first, in, out)`` channel multiples of ``ngf`` for each residual block."""
    if n_up <= 4:  # small images: the head, then one block per stage, halving the channels down to ngf
        top = 2**n_up
        return [(False, top, top)] + [(True, 2 ** (n_up - i), 2 ** (n_up - i - 1)) for i in range(n_up)]
    tail = [(True, 16, 8), (True, 8, 4), (True, 4, 2), (True, 2, 1)]
    if n_up == 5:  # paper "normal": head, up, middle x2, then four upsampling blocks
        return [(False, 16, 16), (True, 16, 16), (False, 16, 16), *tail]
    if n_up == 6:  # "more": an upsampling step between the two middle blocks
        return [(False, 16, 16), (True, 16, 16), (True, 16, 16), *tail]
    if n_up == 7:  # "most": one more upsampling block at the end, to ngf // 2
        return [(False, 16, 16), (True, 16, 16), (True, 16, 16), *tail, (True, 1, 0.5)]
    raise ConfigError(f"SPADE generator: {n_up} upsampling stages; at most 7 (raise model.model.latent_size)")


class SPADEGenerator(nn.Module):
    """Label map ``[B, label_nc, H, W]`` (+ style ``z`` ``[B, z_dim]`` when ``use_vae``) -> image in [-1, 1].

    ``latent_size`` is the starting grid's height (its width follows the aspect ratio); the number of
    upsampling stages is ``log2(H / latent_size)`` (256 px with 8: 5 stages, the paper's default)."""

    def __init__(self, label_nc: int, image_size=256, aspect_ratio: float = 1.0, ngf: int = 64,
                 latent_size: int = 8, use_vae: bool = False, z_dim: int = 256, spectral: bool = True,
                 norm: str = "batch", hidden: int = 128, kernel_size: int = 3, out_channels: int = 3):
        super().__init__()
        h, w = output_size(image_size, aspect_ratio)
        n_up = math.log2(h / latent_size) if latent_size > 0 else -1
        if n_up < 0 or n_up != int(n_up) or w % (h // latent_size):
            raise ConfigError(f"SPADE generator: output {h}x{w} is not latent_size={latent_size} times a power of "
                              "two (set model.model.latent_size to a divisor of the height)")
        self.n_up = int(n_up)
        self.sh, self.sw = latent_size, w // 2**self.n_up
        self.size = (h, w)
        self.use_vae, self.z_dim, self.ngf = use_vae, z_dim, ngf
        layout = block_layout(self.n_up)
        self.top = int(layout[0][1] * ngf)
        if use_vae:
            self.fc = nn.Linear(z_dim, self.top * self.sh * self.sw)
        else:
            self.fc = nn.Conv2d(label_nc, self.top, 3, padding=1)
        self.upsample_before = [up for up, _, _ in layout]
        self.blocks = nn.ModuleList(
            SPADEResBlock(int(cin * ngf), int(cout * ngf), label_nc, spectral, norm, hidden, kernel_size)
            for _, cin, cout in layout)
        self.conv_img = nn.Conv2d(int(layout[-1][2] * ngf), out_channels, 3, padding=1)

    def forward(self, seg: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        if self.use_vae:
            if z is None:
                z = torch.randn(seg.shape[0], self.z_dim, device=seg.device, dtype=seg.dtype)
            x = self.fc(z).view(-1, self.top, self.sh, self.sw)
        else:
            x = self.fc(F.interpolate(seg, size=(self.sh, self.sw), mode="nearest"))
        for up, block in zip(self.upsample_before, self.blocks):
            if up:
                x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = block(x, seg)
        return torch.tanh(self.conv_img(F.leaky_relu(x, 0.2)))


class MultiscaleDiscriminator(nn.Module):
    """``num_d`` PatchGANs on ``cat(map, image)`` at full, 1/2, 1/4 ... resolution (3x3 average pooling,
    stride 2, padding not counted). ``forward`` -> a list per scale of the intermediate features after each
    LeakyReLU, the patch logits last."""

    def __init__(self, input_nc: int, ndf: int = 64, n_layers: int = 3, num_d: int = 2, norm: str = "instance",
                 spectral: bool = True):
        super().__init__()
        if norm not in ("instance", "batch", "actnorm", "none"):
            raise ConfigError(f"model.loss.disc_norm={norm!r}: use instance, batch, actnorm or none")
        self.scales = nn.ModuleList()
        for _ in range(num_d):
            d = NLayerDiscriminator(input_nc, ndf, n_layers, norm="actnorm" if norm == "actnorm" else "batch")
            layers = list(d.main)
            for i, m in enumerate(layers):
                if isinstance(m, nn.BatchNorm2d) and norm != "batch":
                    layers[i] = nn.InstanceNorm2d(m.num_features, affine=False) if norm == "instance" else nn.Identity()
            convs = [i for i, m in enumerate(layers) if isinstance(m, nn.Conv2d)]
            if spectral:  # the middle convolutions, as the reference's norm layer wraps them
                for i in convs[1:-1]:
                    layers[i] = spectral_norm(layers[i])
            d.main = nn.Sequential(*layers)
            self.scales.append(d)

    @staticmethod
    def features(d: NLayerDiscriminator, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for m in d.main:
            x = m(x)
            if isinstance(m, nn.LeakyReLU):
                out.append(x)
        out.append(x)
        return out

    def forward(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        results = []
        for i, d in enumerate(self.scales):
            if i:
                x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
            results.append(self.features(d, x))
        return results


class StyleEncoder(nn.Module):
    """Image ``[B, 3, H, W]`` -> ``(mu, logvar)`` ``[B, z_dim]`` each: stride-2 3x3 convs (instance norm,
    spectral norm optional, LeakyReLU 0.2) until the shorter side is 4 px, channels ``nef * min(2^i, 8)``."""

    def __init__(self, image_size=256, aspect_ratio: float = 1.0, nef: int = 64, z_dim: int = 256,
                 spectral: bool = True, in_channels: int = 3):
        super().__init__()
        h, w = output_size(image_size, aspect_ratio)
        n = int(math.log2(min(h, w) / 4)) if min(h, w) >= 8 else 1
        layers, cin = [], in_channels
        for i in range(n):
            cout = nef * min(2**i, 8)
            layers += [_sn(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), spectral),
                       nn.InstanceNorm2d(cout, affine=False), nn.LeakyReLU(0.2)]
            cin = cout
        self.net = nn.Sequential(*layers)
        gh, gw = h, w
        for _ in range(n):
            gh, gw = (gh + 1) // 2, (gw + 1) // 2
        self.fc_mu = nn.Linear(cin * gh * gw, z_dim)
        self.fc_var = nn.Linear(cin * gh * gw, z_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.net(x).flatten(1)
        return self.fc_mu(h), self.fc_var(h)
