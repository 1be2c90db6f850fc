"""A tiny, deterministic image tokenizer that follows the t2i contract (for tests of later stages).

``PoolTokenizer``: encode = average-pool by ``downsample``, then snap every pooled colour to the
nearest entry of a ``levels**3`` palette (uniform levels per channel) and return its index;
decode = paint each cell with its palette colour. A real vector quantiser, if a trivial one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from t2i.models.records import tokenizer_entry

TARGET = "tests.toy_tokenizer.PoolTokenizer"


class PoolTokenizer(nn.Module):
    def __init__(self, downsample: int = 4, levels: int = 4):
        super().__init__()
        self.downsample, self.levels = int(downsample), int(levels)
        self.codebook_size = self.levels**3
        steps = torch.linspace(-1.0, 1.0, self.levels)
        r, g, b = torch.meshgrid(steps, steps, steps, indexing="ij")
        self.register_buffer("palette", torch.stack([r, g, b], -1).reshape(-1, 3))  # [K, 3], index r*L*L+g*L+b

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        pooled = F.avg_pool2d(images.float(), self.downsample)  # [B, 3, h, w]
        q = ((pooled.clamp(-1, 1) + 1) / 2 * (self.levels - 1)).round().long()  # per channel level
        return q[:, 0] * self.levels**2 + q[:, 1] * self.levels + q[:, 2]

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        colours = self.palette[codes].permute(0, 3, 1, 2)  # [B, 3, h, w]
        return colours.repeat_interleave(self.downsample, 2).repeat_interleave(self.downsample, 3)


def save_checkpoint(path, downsample: int = 4, levels: int = 4) -> PoolTokenizer:
    """Save a PoolTokenizer as a t2i tokenizer checkpoint (what a LightningModule would write)."""
    model = PoolTokenizer(downsample, levels)
    torch.save({
        "state_dict": {"model." + k: v for k, v in model.state_dict().items()},
        "t2i_tokenizer": tokenizer_entry(TARGET, {"downsample": downsample, "levels": levels}, "model."),
    }, path)
    return model
