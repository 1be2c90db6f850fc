"""Symmetric InfoNCE for CLIP with negatives from every DDP rank.

Features are gathered from all ranks with gradient (``torch.distributed.nn.functional.all_gather``),
so every rank's images are negatives for every rank's captions. ``local_loss=False`` scores the whole
gathered matrix on each rank; ``local_loss=True`` scores only this rank's rows against all columns
(cheaper, the same gradients after DDP averaging). Both match open_clip's ``ClipLoss`` with
``gather_with_grad=True`` (tested in a 2-process gloo run).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, keeping the gradient path to each rank's part."""
    _, size = world()
    if size == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


class ContrastiveLoss(nn.Module):
    def __init__(self, local_loss: bool = False):
        super().__init__()
        self.local_loss = local_loss

    def forward(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        """``image``, ``text``: this rank's unit-length features ``[B, D]`` (pairs row by row);
        ``logit_scale``: the (already exponentiated) temperature."""
        rank, size = world()
        all_image, all_text = gather(image), gather(text)
        if self.local_loss:
            per_image, per_text = logit_scale * image @ all_text.t(), logit_scale * text @ all_image.t()
            labels = torch.arange(image.shape[0], device=image.device) + rank * image.shape[0]
        else:
            per_image = logit_scale * all_image @ all_text.t()
            per_text = per_image.t()
            labels = torch.arange(per_image.shape[0], device=image.device)
        return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2
