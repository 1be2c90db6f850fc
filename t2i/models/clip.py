"""CLIP (Radford et al.): an image encoder and a text encoder projected into one space, for reranking.

The image encoder is a ViT (``patch_size``, ``width``, ``layers``, ``heads``) or a small ResNet
(``image_encoder: resnet``); the text encoder is a bidirectional transformer over our own text
tokenizer's ids (so Chinese works), mean-pooled over the caption's tokens (pads masked). Both end in
a linear projection to ``embed_dim`` and L2 normalisation; ``logit_scale`` is learned and clamped at
``ln(100)`` as in CLIP. Images are ``[B, 3, H, W]`` in [-1, 1] (the pipeline's convention).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from t2i.errors import ConfigError
from t2i.models.attention import attend

MAX_LOGIT_SCALE = math.log(100.0)


class EncoderBlock(nn.Module):
    """Pre-LN transformer block with bidirectional attention and an optional key padding mask."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, attn_impl: str = "sdpa"):
        super().__init__()
        if width % heads:
            raise ConfigError(f"CLIP width {width} is not divisible by heads {heads}")
        self.heads, self.attn_impl = heads, attn_impl
        self.ln_1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, int(width * mlp_ratio)), nn.GELU(), nn.Linear(int(width * mlp_ratio), width))

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        mask = keep[:, None, None, :] if keep is not None else None  # [B, 1, 1, T]: attend to kept keys
        y = attend(q, k, v, mask, impl=self.attn_impl)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.ln_2(x))


class ViT(nn.Module):
    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int, attn_impl: str = "sdpa"):
        super().__init__()
        if image_size % patch_size:
            raise ConfigError(f"CLIP image_size {image_size} is not divisible by patch_size {patch_size}")
        self.patch = nn.Conv2d(3, width, patch_size, stride=patch_size)
        n = (image_size // patch_size) ** 2
        self.cls = nn.Parameter(torch.randn(width) * width**-0.5)
        self.pos = nn.Parameter(torch.randn(n + 1, width) * 0.01)
        self.blocks = nn.ModuleList(EncoderBlock(width, heads, attn_impl=attn_impl) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], 1, -1), x], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.ln(x[:, 0])


class ResNet(nn.Module):
    """A small ResNet: stem, one residual block per stage (stride 2 between stages), global average pool."""

    def __init__(self, width: int, layers: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.GroupNorm(8, width), nn.SiLU())
        stages, ch = [], width
        for i in range(layers):
            out = width * 2 ** min(i, 3)
            stages.append(_ResBlock(ch, out, stride=1 if i == 0 else 2))
            ch = out
        self.stages = nn.Sequential(*stages)
        self.width = ch

    def forward(self, x):
        return self.stages(self.stem(x)).mean(dim=(2, 3))


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
        self.norm1 = nn.GroupNorm(8, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(8, cout)
        self.skip = nn.Conv2d(cin, cout, 1, stride=stride) if (cin != cout or stride != 1) else nn.Identity()

    def forward(self, x):
        h = F.silu(self.norm1(self.conv1(x)))
        return F.silu(self.norm2(self.conv2(h)) + self.skip(x))


class TextEncoder(nn.Module):
    def __init__(self, vocab_size: int, text_len: int, width: int, layers: int, heads: int, pad_id: int,
                 attn_impl: str = "sdpa"):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, width)
        self.pos = nn.Parameter(torch.randn(text_len, width) * 0.01)
        self.blocks = nn.ModuleList(EncoderBlock(width, heads, attn_impl=attn_impl) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.pad_id, self.text_len, self.width = pad_id, text_len, width

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] > self.text_len:
            raise ConfigError(f"CLIP text: {ids.shape[1]} tokens per caption, the model takes {self.text_len}")
        keep = ids != self.pad_id
        keep[:, 0] |= ~keep.any(1)  # an empty caption still attends to one position
        x = self.tok(ids) + self.pos[: ids.shape[1]]
        for block in self.blocks:
            x = block(x, keep)
        x = self.ln(x)
        w = keep.unsqueeze(-1).to(x.dtype)
        return (x * w).sum(1) / w.sum(1)


class CLIP(nn.Module):
    """``encode_image(images) -> [B, D]``, ``encode_text(ids) -> [B, D]`` (both unit length),
    ``score(images, ids) -> [B]`` (cosine similarity of each pair), ``logits(images, ids) -> [B, B]``."""

    def __init__(self, vocab_size: int, text_len: int, pad_id: int = 0, image_size: int = 32, embed_dim: int = 128,
                 image_encoder: str = "vit", patch_size: int = 4, vision_width: int = 128, vision_layers: int = 4,
                 vision_heads: int = 4, text_width: int = 128, text_layers: int = 4, text_heads: int = 4,
                 init_logit_scale: float = math.log(1 / 0.07), attn_impl: str = "sdpa"):
        super().__init__()
        if attn_impl not in ("sdpa", "math"):
            raise ConfigError(f"CLIP attn_impl={attn_impl!r} is unknown; use sdpa or math")
        if image_encoder == "vit":
            self.visual = ViT(image_size, patch_size, vision_width, vision_layers, vision_heads, attn_impl)
        elif image_encoder == "resnet":
            self.visual = ResNet(vision_width, vision_layers)
        else:
            raise ConfigError(f"CLIP image_encoder={image_encoder!r} is unknown; use vit or resnet")
        self.text = TextEncoder(vocab_size, text_len, text_width, text_layers, text_heads, pad_id, attn_impl)
        self.image_proj = nn.Linear(self.visual.width, embed_dim, bias=False)
        self.text_proj = nn.Linear(self.text.width, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.image_size, self.text_len, self.pad_id = image_size, text_len, pad_id

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                   antialias=True, align_corners=False)
        return F.normalize(self.image_proj(self.visual(images)), dim=-1)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text(ids)), dim=-1)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    def score(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return (self.encode_image(images) * self.encode_text(ids)).sum(-1)

    def logits(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.scale() * self.encode_image(images) @ self.encode_text(ids).t()
