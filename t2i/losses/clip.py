"""Symmetric InfoNCE for CLIP with negatives from every DDP rank.

Features are gathered from all ranks with gradient (``torch.distributed.nn.functional.all_gather``),
so every rank's images are negatives for every rank's captions. ``local_loss=False`` scores the whole
gathered matrix on each rank; ``local_loss=True`` scores only this rank's rows against all columns
(cheaper, the same gradients after DDP averaging). Both match open_clip's ``ClipLoss`` with
``gather_with_grad=True`` (tested in a 2-process gloo run). Ranks may hold different batch sizes: parts
are padded to a common row count and the padding is masked out of the logits and the mean, so the loss
is the one process's loss over the same pairs (tested with one rank one row short).
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


def gather(x: torch.Tensor, rows: int | None = None, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate ``x`` from every rank along dim 0, keeping the gradient path to each rank's part, and
    return it with a bool mask of the real rows. Ranks may hold different numbers of rows (a batch that
    lost an undecodable image): each pads its part to ``rows`` (every rank's upper bound, the loader's
    batch size; None: the ranks' largest, which costs a host sync). Only the first ``count`` rows of
    ``x`` are real (default: all)."""
    count = x.shape[0] if count is None else count
    _, size = world()
    if size == 1:
        return x, torch.arange(x.shape[0], device=x.device) < count
    from torch.distributed.nn.functional import all_gather

    n = torch.tensor([count], device=x.device)
    sizes = [torch.empty_like(n) for _ in range(size)]
    dist.all_gather(sizes, n)
    sizes = torch.cat(sizes)
    if rows is None or rows < x.shape[0]:
        rows = int(sizes.max())
    padded = F.pad(x, (0, 0, 0, rows - x.shape[0]))
    valid = (torch.arange(rows, device=x.device)[None, :] < sizes[:, None]).flatten()
    return torch.cat(all_gather(padded), dim=0), valid


class ContrastiveLoss(nn.Module):
    def __init__(self, local_loss: bool = False):
        super().__init__()
        self.local_loss = local_loss

    def forward(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                rows: int | None = None, count: int | None = None) -> torch.Tensor:
        """``image``, ``text``: this rank's unit-length features ``[B, D]`` (pairs row by row; ``B`` may
        differ between ranks, up to ``rows``; only the first ``count`` pairs are real, default all);
        ``logit_scale``: the (already exponentiated) temperature. The value's gradient, averaged over
        ranks by DDP, is that of the mean over all ranks' real pairs (NaN when there is none)."""
        rank, size = world()
        (all_image, valid), (all_text, _) = gather(image, rows, count), gather(text, rows, count)
        total = valid.sum()  # pairs on all ranks
        if self.local_loss:
            per_image, per_text = logit_scale * image @ all_text.t(), logit_scale * text @ all_image.t()
            padded = all_image.shape[0] // size  # rows per rank after padding
            labels = torch.arange(image.shape[0], device=image.device) + rank * padded
            mine = torch.arange(image.shape[0], device=image.device) < (image.shape[0] if count is None else count)
            scale = size  # DDP divides the summed gradients by the world size
        else:
            per_image = logit_scale * all_image @ all_text.t()
            per_text = per_image.t()
            labels = torch.arange(per_image.shape[0], device=image.device)
            mine, scale = valid, 1
        per_image, per_text = (m.masked_fill(~valid[None, :], float("-inf")) for m in (per_image, per_text))
        ce = F.cross_entropy(per_image, labels, reduction="none") + F.cross_entropy(per_text, labels, reduction="none")
        loss = torch.where(mine, ce, 0.0).sum() * scale / (2 * total)  # a mask, not indexing: no host sync
        # no pair on any rank: NaN gradients (a skipped step), through a path the mask does not cut
        nan_if_none = torch.where(total > 0, 0.0, float("nan"))
        return loss + nan_if_none * (image.sum() + text.sum())
