"""RRDBNet super-resolution generator (ESRGAN, Wang et al. 2018; Real-ESRGAN, Wang et al. 2021).

    conv_first -> body (num_block x RRDB) -> conv_body, added to the conv_first features
    -> [nearest x2 -> conv_upK -> LeakyReLU] x (2, or 3 for scale 8) -> conv_hr -> LeakyReLU -> conv_last

An RRDB is three residual dense blocks (``rdb1..3``) whose sum is scaled by 0.2 and added to its input;
a residual dense block is five 3x3 convs (``conv1..5``), each reading the block input concatenated with
all earlier outputs (``num_grow_ch`` channels each), LeakyReLU(0.2) after the first four, and its output
is likewise ``0.2 * conv5 + input``. Real-ESRGAN's x2 and x1 models first pixel-unshuffle the input by
2 and 4 (so the x4 trunk still upsamples 4x); its x8 model adds a third upsampling conv (``conv_up3``).
Parameter names equal Real-ESRGAN's state-dict keys, so its released ``params_ema`` load strictly
(:func:`t2i.pretrained.realesrgan.load_realesrgan`).

Images: ``[B, C, H, W]`` in **[0, 1]** (Real-ESRGAN's training range) in and out; the output is not
clamped. Scale 2 needs H, W divisible by 2 and scale 1 by 4; :func:`upscale` pads for you.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SCALES = (1, 2, 4, 8)


def unshuffle_factor(scale: int) -> int:
    """How much the input is pixel-unshuffled before the trunk (which always upsamples 4x or 8x)."""
    return {1: 4, 2: 2}.get(int(scale), 1)


class ResidualDenseBlock(nn.Module):
    def __init__(self, num_feat: int = 64, num_grow_ch: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_grow_ch, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat + num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv3 = nn.Conv2d(num_feat + 2 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv4 = nn.Conv2d(num_feat + 3 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv5 = nn.Conv2d(num_feat + 4 * num_grow_ch, num_feat, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            feats.append(F.leaky_relu(conv(torch.cat(feats, 1)), 0.2))
        return x + 0.2 * self.conv5(torch.cat(feats, 1))


class RRDB(nn.Module):
    def __init__(self, num_feat: int, num_grow_ch: int = 32):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.2 * self.rdb3(self.rdb2(self.rdb1(x)))


class RRDBNet(nn.Module):
    def __init__(self, num_in_ch: int = 3, num_out_ch: int = 3, scale: int = 4, num_feat: int = 64,
                 num_block: int = 23, num_grow_ch: int = 32):
        super().__init__()
        if int(scale) not in SCALES:
            raise ValueError(f"RRDBNet scale={scale}: Real-ESRGAN's generator comes in scales {SCALES}")
        self.scale = int(scale)
        self.config = dict(num_in_ch=int(num_in_ch), num_out_ch=int(num_out_ch), scale=self.scale,
                           num_feat=int(num_feat), num_block=int(num_block), num_grow_ch=int(num_grow_ch))
        self.unshuffle = unshuffle_factor(self.scale)
        self.conv_first = nn.Conv2d(num_in_ch * self.unshuffle ** 2, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*[RRDB(num_feat, num_grow_ch) for _ in range(num_block)])
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        if self.scale == 8:
            self.conv_up3 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)

    @property
    def receptive_radius(self) -> int:
        """Input pixels on each side that reach one output pixel (an upper bound). A tile padded by at
        least this much gives exactly the untiled output (see :func:`upscale`)."""
        lr = 2 + 15 * self.config["num_block"]  # conv_first, conv_body, 3 x 5 convs per RRDB
        hr = (3 if self.scale == 8 else 2) + 2  # conv_upK, conv_hr, conv_last: each <= 1 trunk pixel
        return (lr + hr + 1) * self.unshuffle  # trunk pixels are `unshuffle` input pixels; +1 margin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.unshuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        ups = [self.conv_up1, self.conv_up2] + ([self.conv_up3] if self.scale == 8 else [])
        for conv in ups:
            feat = F.leaky_relu(conv(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))


def _round_up(n: int, m: int) -> int:
    return int(math.ceil(n / m) * m)


@torch.no_grad()
def upscale(model: RRDBNet, images: torch.Tensor, tile: int = 0, tile_pad: int = 10) -> torch.Tensor:
    """``images`` ``[B, C, H, W]`` in [0, 1] -> ``[B, C, H*s, W*s]`` in [0, 1] (not clamped), ``s = model.scale``.

    ``tile=0`` runs the whole image at once. ``tile > 0`` cuts the image into ``tile x tile`` input tiles,
    runs each with ``tile_pad`` pixels of its neighbours around it (fewer at the image border, where the
    untiled run also sees zero padding) and pastes the centre of each result. Tiled equals untiled up
    to float noise when ``tile_pad >= model.receptive_radius``; with less padding (Real-ESRGAN's usual
    10 px on a 23-block model) seams differ slightly, for a bounded memory. For the x2 / x1 models the
    image is reflect-padded on the bottom/right to a multiple of 2 / 4 (cropped afterwards) and tile,
    tile_pad are rounded up to that multiple. Runs on the model's device and dtype.
    """
    if images.dim() != 4:
        raise ValueError(f"upscale expects [B, C, H, W] images, got shape {list(images.shape)}")
    if tile < 0 or tile_pad < 0:
        raise ValueError(f"tile={tile} and tile_pad={tile_pad} must be >= 0")
    p = next(model.parameters())
    x = images.to(device=p.device, dtype=p.dtype)
    s, f = model.scale, model.unshuffle
    h, w = x.shape[-2:]
    ph, pw = _round_up(h, f) - h, _round_up(w, f) - w
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")
    H, W = x.shape[-2:]
    if tile <= 0 or (tile >= H and tile >= W):
        out = model(x)
    else:
        tile, pad = _round_up(tile, f), _round_up(tile_pad, f)
        out = x.new_zeros(x.shape[0], model.config["num_out_ch"], H * s, W * s)
        for y0 in range(0, H, tile):
            for x0 in range(0, W, tile):
                y1, x1 = min(y0 + tile, H), min(x0 + tile, W)
                py0, px0 = max(y0 - pad, 0), max(x0 - pad, 0)
                py1, px1 = min(y1 + pad, H), min(x1 + pad, W)
                res = model(x[..., py0:py1, px0:px1])
                out[..., y0 * s:y1 * s, x0 * s:x1 * s] = res[..., (y0 - py0) * s:(y1 - py0) * s,
                                                             (x0 - px0) * s:(x1 - px0) * s]
    return out[..., :h * s, :w * s]
