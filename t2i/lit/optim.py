"""Optimizer and LR-schedule pieces the LightningModules share."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


def lr_lambda(warmup: int, total: int | None, schedule: str, min_ratio: float = 0.1):
    """Multiplier of the base LR at a step: linear warm-up, then constant or cosine to ``min_ratio``."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "cosine" and total and total > warmup:
            t = min(1.0, (step - warmup) / (total - warmup))
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
        return 1.0

    return f


def total_steps(module) -> int | None:
    """``hparams.total_steps``, else the trainer's estimate of optimizer steps (None when unknown)."""
    total = module.hparams.total_steps or (module.trainer.estimated_stepping_batches if module._trainer else None)
    return int(total) if total and math.isfinite(total) else None


def adamw_warmup_cosine(module, model: nn.Module, no_decay: Callable[[str, nn.Parameter], bool]) -> dict:
    """AdamW (no weight decay where ``no_decay(name, param)``) with a per-step warm-up + cosine/constant
    schedule, from the module's ``lr``, ``betas``, ``weight_decay``, ``warmup_steps``, ``schedule``,
    ``total_steps`` and ``min_lr_ratio`` hyper-parameters; the ``configure_optimizers`` return value."""
    h = module.hparams
    decay, plain = [], []
    for n, p in model.named_parameters():
        (plain if no_decay(n, p) else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": h.weight_decay},
                             {"params": plain, "weight_decay": 0.0}], lr=h.lr, betas=tuple(h.betas))
    schedule = lr_lambda(h.warmup_steps, total_steps(module), h.schedule, h.min_lr_ratio)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, schedule),
                                               "interval": "step"}}


def clip_grad_norm(module, optimizer, max_norm: float) -> None:
    """Clip the gradient norm; under FSDP through the sharded root (Lightning's norm clipping cannot
    see the other ranks' shards)."""
    wrapped = module.trainer.strategy.model if module._trainer is not None else None
    if wrapped is not None and hasattr(wrapped, "clip_grad_norm_"):
        wrapped.clip_grad_norm_(max_norm)
    else:
        module.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")
