"""The discrete VAE of DALL·E (Ramesh et al., 2021) as a plain ``nn.Module``.

Encoder: 7x7 conv -> ``group_count`` groups of ``n_blk_per_group`` bottleneck residual blocks with
widths ``n_hid * (1, 2, 4, 8, ...)`` and a 2x max-pool between groups -> ReLU + 1x1 conv to
``vocab_size`` logits per position. Decoder: 1x1 conv from (soft) one-hot codes to ``n_init``
channels -> groups of residual blocks with widths ``n_hid * (..., 4, 2, 1)`` and nearest 2x
upsampling between groups -> ReLU + 1x1 conv to ``2 * output_channels`` channels: the location
(logit space) and log-scale of the logit-Laplace likelihood of every pixel.

Parameter names equal those of the ``dall_e`` package's ``Encoder``/``Decoder`` (``blocks.input.w``,
``blocks.group_1.block_1.res_path.conv_1.w``, ``blocks.output.conv.b`` ...), so with
``group_count=4`` their state dicts load directly into ``DVAE.encoder`` / ``DVAE.decoder``.

Pixels go through the paper's map ``x -> (1 - 2 eps) x + eps`` (``eps = 0.1``) before the encoder,
and decoded means through its inverse; :meth:`DVAE.encode` / :meth:`DVAE.decode` follow the image
tokenizer contract of :mod:`t2i.models` (images in [-1, 1]).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

LOGIT_LAPLACE_EPS = 0.1


def map_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """[0, 1] pixels -> [eps, 1 - eps], the support the logit-Laplace likelihood is defined on."""
    return (1 - 2 * eps) * x + eps


def unmap_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """Inverse of :func:`map_pixels`, clamped to [0, 1]."""
    return ((x - eps) / (1 - 2 * eps)).clamp(0, 1)


class Conv2d(nn.Module):
    """A 'same'-padded conv with weight ``w`` [out, in, k, k] and bias ``b`` (the dall_e parameter layout).

    Initialised as in the paper's code: ``w ~ N(0, 1 / (in * k^2))``, ``b = 0``.
    """

    def __init__(self, n_in: int, n_out: int, kernel: int):
        super().__init__()
        if kernel % 2 != 1:
            raise ValueError(f"kernel size must be odd, got {kernel}")
        self.kernel = kernel
        self.w = nn.Parameter(torch.randn(n_out, n_in, kernel, kernel) / (n_in * kernel**2) ** 0.5)
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w.to(x.dtype), self.b.to(x.dtype), padding=(self.kernel - 1) // 2)

    def extra_repr(self) -> str:
        return f"{self.w.shape[1]}, {self.w.shape[0]}, kernel={self.kernel}"


class ResBlock(nn.Module):
    """``id_path(x) + post_gain * res_path(x)``; the residual path is a bottleneck with ``n_out // 4`` channels.

    ``kernels`` are the four conv sizes of the residual path: (3, 3, 3, 1) in the encoder, (1, 3, 3, 3) in
    the decoder (as in dall_e). ``post_gain = 1 / n_layers**2`` keeps deep stacks near identity at init.
    """

    def __init__(self, n_in: int, n_out: int, n_layers: int, kernels: tuple[int, int, int, int]):
        super().__init__()
        if n_out % 4:
            raise ValueError(f"block width must be a multiple of 4, got {n_out}")
        hid = n_out // 4
        self.post_gain = 1 / n_layers**2
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = [n_in, hid, hid, hid, n_out]
        layers = []
        for i, k in enumerate(kernels):
            layers += [(f"relu_{i + 1}", nn.ReLU()), (f"conv_{i + 1}", Conv2d(widths[i], widths[i + 1], k))]
        self.res_path = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


def _output(n_in: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", Conv2d(n_in, n_out, 1))]))


class Encoder(nn.Module):
    """Images (mapped pixels) [B, C, H, W] -> code logits [B, vocab_size, H / 2^(G-1), W / 2^(G-1)]."""

    def __init__(self, group_count: int = 4, n_hid: int = 256, n_blk_per_group: int = 2, input_channels: int = 3,
                 vocab_size: int = 8192):
        super().__init__()
        n_layers = group_count * n_blk_per_group
        widths = [n_hid * 2**g for g in range(group_count)]
        blocks: list[tuple[str, nn.Module]] = [("input", Conv2d(input_channels, n_hid, 7))]
        n_in = n_hid
        for g, width in enumerate(widths):
            group = []
            for i in range(n_blk_per_group):
                group.append((f"block_{i + 1}", ResBlock(n_in, width, n_layers, (3, 3, 3, 1))))
                n_in = width
            if g < group_count - 1:
                group.append(("pool", nn.MaxPool2d(kernel_size=2)))
            blocks.append((f"group_{g + 1}", nn.Sequential(OrderedDict(group))))
        blocks.append(("output", _output(n_in, vocab_size)))
        self.blocks = nn.Sequential(OrderedDict(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class Decoder(nn.Module):
    """(Soft) one-hot codes [B, vocab_size, h, w] -> logit-Laplace statistics [B, 2 * output_channels, H, W]."""

    def __init__(self, group_count: int = 4, n_init: int = 128, n_hid: int = 256, n_blk_per_group: int = 2,
                 output_channels: int = 3, vocab_size: int = 8192):
        super().__init__()
        n_layers = group_count * n_blk_per_group
        widths = [n_hid * 2**g for g in reversed(range(group_count))]
        blocks: list[tuple[str, nn.Module]] = [("input", Conv2d(vocab_size, n_init, 1))]
        n_in = n_init
        for g, width in enumerate(widths):
            group = []
            for i in range(n_blk_per_group):
                group.append((f"block_{i + 1}", ResBlock(n_in, width, n_layers, (1, 3, 3, 3))))
                n_in = width
            if g < group_count - 1:
                group.append(("upsample", nn.Upsample(scale_factor=2, mode="nearest")))
            blocks.append((f"group_{g + 1}", nn.Sequential(OrderedDict(group))))
        blocks.append(("output", _output(n_in, 2 * output_channels)))
        self.blocks = nn.Sequential(OrderedDict(blocks))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.blocks(z)


class DVAE(nn.Module):
    """DALL·E's discrete VAE; an image tokenizer (``encode``/``decode``, ``codebook_size``, ``downsample``).

    All constructor arguments are plain numbers so the model can be rebuilt from a checkpoint entry.
    ``DVAE()`` is the released DALL·E model (f8, 8192 codes); tests use e.g.
    ``DVAE(n_hid=16, n_blk_per_group=1, vocab_size=64, group_count=3)``.
    """

    def __init__(self, n_hid: int = 256, n_blk_per_group: int = 2, vocab_size: int = 8192, group_count: int = 4,
                 input_channels: int = 3, output_channels: int = 3, n_init: int = 128,
                 logit_laplace_eps: float = LOGIT_LAPLACE_EPS):
        super().__init__()
        if group_count < 1 or n_blk_per_group < 1:
            raise ValueError(f"group_count and n_blk_per_group must be >= 1, got {group_count}, {n_blk_per_group}")
        self.config = dict(n_hid=n_hid, n_blk_per_group=n_blk_per_group, vocab_size=vocab_size,
                           group_count=group_count, input_channels=input_channels, output_channels=output_channels,
                           n_init=n_init, logit_laplace_eps=logit_laplace_eps)
        self.codebook_size = vocab_size
        self.downsample = 2 ** (group_count - 1)
        self.input_channels, self.output_channels = input_channels, output_channels
        self.eps = logit_laplace_eps
        self.encoder = Encoder(group_count, n_hid, n_blk_per_group, input_channels, vocab_size)
        self.decoder = Decoder(group_count, n_init, n_hid, n_blk_per_group, output_channels, vocab_size)

    # -- pieces -------------------------------------------------------------------------------
    def _check(self, images: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != self.input_channels:
            raise ValueError(f"dVAE expects images [B, {self.input_channels}, H, W], got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h % self.downsample or w % self.downsample:
            raise ValueError(f"image size {h}x{w} is not divisible by the dVAE downsampling factor "
                             f"{self.downsample} (group_count={self.config['group_count']})")

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Code logits [B, vocab, h, w] for images in [-1, 1]."""
        self._check(images)
        return self.encoder(map_pixels((images + 1) / 2, self.eps))

    def stats_to_images(self, stats: torch.Tensor) -> torch.Tensor:
        """Decoder outputs -> images in [-1, 1] (sigmoid of the location, unmapped)."""
        mean = torch.sigmoid(stats[:, : self.output_channels].float())
        return unmap_pixels(mean, self.eps) * 2 - 1

    # -- tokenizer contract ---------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] in [-1, 1] -> codes LongTensor [B, H / downsample, W / downsample] (argmax)."""
        return self.logits(images).argmax(dim=1)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, h, w] -> images [B, C, h * downsample, w * downsample] in [-1, 1]."""
        if codes.dim() != 3:
            raise ValueError(f"dVAE.decode expects codes [B, h, w], got {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), got [{int(codes.min())}, "
                             f"{int(codes.max())}]")
        z = F.one_hot(codes.long(), self.codebook_size).permute(0, 3, 1, 2).to(self.decoder.blocks.input.w.dtype)
        return self.stats_to_images(self.decoder(z))

    # -- training -------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, temperature: float = 1.0, hard: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns ``(decoder outputs [B, 2C, H, W], logits [B, K, h, w], codes one-hot [B, K, h, w])``.

        In training mode the codes are a Gumbel-softmax sample at ``temperature`` (straight-through
        one-hot when ``hard``); in eval mode they are the one-hot argmax, as used for tokenizing.
        """
        logits = self.logits(images)
        if self.training:
            z = F.gumbel_softmax(logits.float(), tau=temperature, hard=hard, dim=1).to(logits.dtype)
        else:
            z = F.one_hot(logits.argmax(dim=1), self.codebook_size).permute(0, 3, 1, 2).to(logits.dtype)
        return self.decoder(z), logits, z
