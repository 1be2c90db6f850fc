"""Optimizer and LR-schedule pieces the LightningModules share.

Skipped steps (:class:`StepGuard`): a step whose gradient norm is not finite (a NaN/inf loss on any
rank: DDP averages the gradients, so one rank's NaN reaches every rank) is skipped on the device by the
fused AdamW's ``found_inf`` input -- weights, moments and step count unchanged, on every rank alike,
with no host synchronisation. The count of consecutive skipped steps lives on the device too and is
read every ``check_every`` steps (at most ``max_bad``), and at every step while the last read saw a run of
skipped steps going on: a run long enough to pass the limit always holds a regular read, so the run stops at
the very step it reaches ``max_bad``, on every rank at once (their counters are equal), while a healthy run
reads the host once per ``check_every`` steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from t2i.errors import T2IError


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
    # fused: one kernel per step, and a device-side skip of non-finite steps (StepGuard's found_inf)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": h.weight_decay},
                             {"params": plain, "weight_decay": 0.0}], lr=h.lr, betas=tuple(h.betas), fused=True)
    schedule = lr_lambda(h.warmup_steps, total_steps(module), h.schedule, h.min_lr_ratio)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, schedule),
                                               "interval": "step"}}


def clip_grad_norm(module, optimizer, max_norm: float | None) -> torch.Tensor:
    """Clip the gradient norm to ``max_norm`` (None: only measure it) and return the total norm (a device
    tensor, no host sync); under FSDP through the sharded root, whose norm covers every rank's shard."""
    wrapped = module.trainer.strategy.model if module._trainer is not None else None
    limit = float(max_norm) if max_norm else math.inf
    if wrapped is not None and hasattr(wrapped, "clip_grad_norm_"):
        return wrapped.clip_grad_norm_(limit)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not params:
        return torch.zeros(())
    if max_norm:
        return torch.nn.utils.clip_grad_norm_(params, limit, foreach=True)
    return torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)


class StepGuard:
    """Skips optimizer steps whose gradient norm is not finite, identically on every rank, on the device.

    ``after_backward(optimizer, grad_norm)`` (call it once per optimizer step, after the gradients are
    final: in ``configure_gradient_clipping``) hands ``found_inf`` to the fused AdamW, which then leaves
    weights and moments untouched, and counts skipped steps. ``ok`` is the last step's verdict (a 0-dim
    bool tensor) for an EMA update. ``check(step)`` reads the counter every ``check_every`` steps (the
    only host sync; ``step=0`` forces a read, e.g. at the epoch's end; every step while a run of skipped
    steps is going on) and raises ``error(n)`` at the step where ``max_bad`` steps in a row were skipped."""

    def __init__(self, max_bad: int, check_every: int = 10):
        self.max_bad = int(max_bad)
        self.check_every = max(1, min(int(check_every), self.max_bad))  # never later than the limit
        self.ok: torch.Tensor | None = None
        self._run = self._worst = self._total = None
        self._in_run = False  # the last read saw skipped steps going on: read every step until it ends

    def after_backward(self, optimizer, grad_norm: torch.Tensor) -> None:
        ok = torch.isfinite(grad_norm)
        if self._run is None or self._run.device != ok.device:
            self._run, self._worst, self._total = (torch.zeros((), dtype=torch.long, device=ok.device) for _ in "abc")
        bad = (~ok).long()
        self._run.add_(1).mul_(bad)  # consecutive skipped steps
        torch.maximum(self._worst, self._run, out=self._worst)
        self._total.add_(bad)
        self.ok = ok
        optimizer.found_inf = bad.float()  # read by the fused AdamW (GradScaler's protocol)

    @property
    def skipped(self) -> torch.Tensor:
        """Steps skipped so far in this process (a device tensor)."""
        return self._total if self._total is not None else torch.zeros((), dtype=torch.long)

    def check(self, step: int, error) -> None:
        if self._worst is None or self.max_bad <= 0 or (step % self.check_every and not self._in_run):
            return
        run, worst = torch.stack([self._run, self._worst]).tolist()  # one read
        self._in_run = run > 0
        if worst >= self.max_bad:
            raise error(worst)


class GuardedSteps:
    """The LightningModule hooks around ``self.guard`` (a :class:`StepGuard`), for modules with automatic
    optimization: clip (``trainer.gradient_clip_val``, else ``hparams.grad_clip`` when the module has one)
    and skip non-finite steps on every rank; log ``train/skipped_steps``; raise a :class:`T2IError` once
    ``max_bad_steps`` steps in a row were skipped. ``bad_loss`` names the loss in that error and
    ``bad_step_hint`` says what to change."""

    bad_loss = "training loss"
    bad_step_hint = "lower model.lr or raise model.warmup_steps"

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        limit = gradient_clip_val or self.hparams.get("grad_clip")
        self.guard.after_backward(optimizer, clip_grad_norm(self, optimizer, limit))

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.log("train/skipped_steps", self.guard.skipped.float())
        self.guard.check(self.global_step, self._too_many_bad_steps)

    def on_train_epoch_end(self):
        self.guard.check(0, self._too_many_bad_steps)

    def _too_many_bad_steps(self, n: int) -> T2IError:
        return T2IError(f"the {self.bad_loss} was NaN/inf for {n} steps in a row (an empty batch counts too; by "
                        f"step {self.global_step}); {self.bad_step_hint}")


def ema_update(ema: nn.Module, model: nn.Module, decay: float, ok: torch.Tensor | None = None) -> None:
    """``ema += (1 - decay) * (model - ema)`` over all parameters in one fused call; no change where
    ``ok`` (a 0-dim bool tensor: the optimizer step was taken) is false."""
    e, p = list(ema.parameters()), list(model.parameters())
    with torch.no_grad():
        if ok is None:
            torch._foreach_lerp_(e, p, 1.0 - decay)
        else:  # a tensor weight per parameter (a 0-dim tensor as one Scalar would be read on the host)
            weight = ok.to(e[0].dtype) * (1.0 - decay)
            torch._foreach_lerp_(e, p, [weight] * len(e))


def live_loss(module) -> bool:
    """``prog_bar=`` for a training step's loss: True only when a progress bar shows it. Lightning turns
    progress-bar metrics into Python floats after every batch (a host sync per step); without a bar
    (``trainer.enable_progress_bar=false``, as on a cluster) the loss is read only every
    ``trainer.log_every_n_steps`` for the loggers."""
    trainer = module._trainer
    return trainer is not None and trainer.progress_bar_callback is not None
