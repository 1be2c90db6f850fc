"""VQGAN image tokenizer (Esser et al., "Taming Transformers"): conv encoder -> quantizer -> conv decoder.

Module and parameter names equal taming-transformers' ``Encoder``/``Decoder`` and ``VQModel``
(``encoder.*``, ``decoder.*``, ``quant_conv``, ``post_quant_conv``, ``quantize.embedding`` or, for
Gumbel, ``quantize.proj``/``quantize.embed``), so the ``state_dict`` of a public taming checkpoint
loads as is once its loss/discriminator entries are dropped.

Shapes: images ``[B, 3, H, W]`` in [-1, 1]; ``f = 2 ** (len(ch_mult) - 1)``; codes ``[B, H/f, W/f]``.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from t2i.models.quantizers import GumbelQuantizer, VectorQuantizer


def Normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm -> swish -> conv3x3, twice (dropout before the second conv), plus a shortcut that is a 1x1
    (``nin_shortcut``) or 3x3 (``conv_shortcut``) conv when the channel count changes."""

    def __init__(self, in_channels: int, out_channels: int | None = None, dropout: float = 0.0,
                 conv_shortcut: bool = False):
        super().__init__()
        out_channels = out_channels or in_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 3, padding=1)
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x) if hasattr(self, "conv_shortcut") else self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, with a residual connection."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        y = self.norm(x)
        q, k, v = (rearrange(f(y), "b c h w -> b (h w) c") for f in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(c)) v
        return x + self.proj_out(rearrange(y, "b (h w) c -> b c h w", h=h, w=w))


class Downsample(nn.Module):
    """Stride-2 3x3 conv after zero-padding right and bottom by one (taming's asymmetric padding)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks: list[nn.Module], attns: list[nn.Module]) -> nn.Module:
    level = nn.Module()
    level.block, level.attn = nn.ModuleList(blocks), nn.ModuleList(attns)
    return level


def _check_channels(ch: int, ch_mult) -> None:
    bad = [ch * m for m in ch_mult if (ch * m) % 32]
    if not ch_mult or bad:
        raise ValueError(f"VQGAN: ch={ch} x ch_mult={list(ch_mult)} must give channel counts divisible by 32 "
                         f"(GroupNorm with 32 groups); got {bad or 'an empty ch_mult'}")


class Encoder(nn.Module):
    """conv_in -> per level: ``num_res_blocks`` ResnetBlocks (+ attention at ``attn_resolutions``) and a
    Downsample (except the last level) -> mid (block_1, attn_1, block_2) -> norm_out, swish, conv_out."""

    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, z_channels, resolution, in_channels=3,
                 dropout=0.0, double_z=False):
        super().__init__()
        _check_channels(ch, ch_mult)
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for i, mult in enumerate(ch_mult):
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, ch * mult, dropout))
                block_in = ch * mult
                if resolution // 2**i in attn_resolutions:
                    attns.append(AttnBlock(block_in))
            level = _level(blocks, attns)
            if i != self.num_resolutions - 1:
                level.downsample = Downsample(block_in)
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if i != self.num_resolutions - 1:
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """conv_in -> mid -> per level from the lowest resolution up: ``num_res_blocks + 1`` ResnetBlocks
    (+ attention) and an Upsample (except level 0) -> norm_out, swish, conv_out. ``up[i]`` works at
    resolution ``resolution / 2**i`` (taming's ordering)."""

    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, z_channels, resolution, out_ch=3,
                 dropout=0.0):
        super().__init__()
        _check_channels(ch, ch_mult)
        self.num_resolutions = len(ch_mult)
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)
        levels: list[nn.Module | None] = [None] * self.num_resolutions
        for i in reversed(range(self.num_resolutions)):
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, ch * ch_mult[i], dropout))
                block_in = ch * ch_mult[i]
                if resolution // 2**i in attn_resolutions:
                    attns.append(AttnBlock(block_in))
            levels[i] = _level(blocks, attns)
            if i != 0:
                levels[i].upsample = Upsample(block_in)
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i in reversed(range(self.num_resolutions)):
            level = self.up[i]
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if i != 0:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def _options(cls, positional: int) -> set[str]:
    return set(list(inspect.signature(cls).parameters)[positional:])


QUANTIZER_OPTIONS = {"vq": _options(VectorQuantizer, 2), "gumbel": _options(GumbelQuantizer, 3)}


def build_quantizer(quantizer: dict | None, n_embed: int, embed_dim: int) -> nn.Module:
    """``{"kind": "vq" | "gumbel", **options}`` -> :class:`VectorQuantizer` or :class:`GumbelQuantizer`.

    Options of the *other* kind are ignored (a Hydra override of ``kind`` keeps the default's VQ keys);
    keys that belong to neither are an error."""
    options = dict(quantizer or {})
    kind = options.pop("kind", "vq")
    if kind not in QUANTIZER_OPTIONS:
        raise ValueError(f"VQGAN quantizer kind {kind!r} is unknown; use one of {sorted(QUANTIZER_OPTIONS)}")
    unknown = set(options) - set().union(*QUANTIZER_OPTIONS.values())
    if unknown:
        raise ValueError(f"VQGAN quantizer: unknown option(s) {sorted(unknown)}; {kind!r} takes "
                         f"{sorted(QUANTIZER_OPTIONS[kind])}")
    options = {k: v for k, v in options.items() if k in QUANTIZER_OPTIONS[kind]}
    if kind == "gumbel":  # proj reads the quant_conv output (embed_dim channels; = z_channels in taming)
        return GumbelQuantizer(embed_dim, embed_dim, n_embed, **options)
    return VectorQuantizer(n_embed, embed_dim, **options)


class VQGAN(nn.Module):
    """Encoder -> quant_conv -> quantizer -> post_quant_conv -> Decoder.

    All constructor arguments are plain JSON-able values; ``self.config`` holds them (lists, not tuples)
    for :func:`t2i.models.records.tokenizer_entry`. ``quantizer`` is ``{"kind": "vq", "beta": 0.25, "legacy":
    False, "l2_normalize": False, "codebook_dim": None, "ema_decay": None, "restart_dead": 0}`` or
    ``{"kind": "gumbel", "temperature": 1.0, "kl_weight": 5e-4, "straight_through": True}`` (keys optional).

    ``forward`` returns the *unclamped* reconstruction (what the losses need); ``decode`` clamps to [-1, 1]
    (what a viewer needs). ``encode`` and ``decode`` never update the codebook.
    """

    def __init__(self, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
                 z_channels=256, embed_dim=256, n_embed=1024, resolution=256, dropout=0.0,
                 quantizer: dict | None = None):
        super().__init__()
        self.config = dict(ch=ch, ch_mult=list(ch_mult), num_res_blocks=num_res_blocks,
                           attn_resolutions=list(attn_resolutions), z_channels=z_channels, embed_dim=embed_dim,
                           n_embed=n_embed, resolution=resolution, dropout=dropout,
                           quantizer=dict(quantizer) if quantizer is not None else None)
        arch = dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks,
                    attn_resolutions=tuple(attn_resolutions), z_channels=z_channels, resolution=resolution,
                    dropout=dropout)
        self.encoder = Encoder(**arch)
        self.decoder = Decoder(**arch)
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.quantize = build_quantizer(quantizer, n_embed, embed_dim)
        self.codebook_size = n_embed
        self.downsample = 2 ** (len(ch_mult) - 1)

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the decoder's final conv (for the adaptive GAN weight)."""
        return self.decoder.conv_out.weight

    def _check_size(self, images: torch.Tensor) -> None:
        if images.ndim != 4:
            raise ValueError(f"VQGAN expects images [B, C, H, W], got shape {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h % self.downsample or w % self.downsample:
            raise ValueError(f"VQGAN: image size {h}x{w} is not divisible by the downsampling factor "
                             f"{self.downsample}; resize or crop to a multiple of {self.downsample}")

    def encode_to_latent(self, images: torch.Tensor) -> torch.Tensor:
        """Pre-quantization latents ``[B, embed_dim, h, w]``."""
        self._check_size(images)
        return self.quant_conv(self.encoder(images))

    def decode_latent(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantized latents ``[B, embed_dim, h, w]`` -> unclamped images."""
        return self.decoder(self.post_quant_conv(z_q))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [-1, 1] -> codes ``LongTensor[B, H/f, W/f]``."""
        return self.quantize.codes(self.encode_to_latent(images))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[B, h, w]`` -> images ``[B, 3, h*f, w*f]`` clamped to [-1, 1]."""
        return self.decode_latent(self.quantize.embed_codes(codes.long())).clamp(-1.0, 1.0)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """``(reconstruction, quantizer loss, info)``; ``info`` has ``codes [B, h, w]``, ``perplexity``
        and the quantizer's other statistics."""
        z_q, qloss, info = self.quantize(self.encode_to_latent(images))
        return self.decode_latent(z_q), qloss, info
