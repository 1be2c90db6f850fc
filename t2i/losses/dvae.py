"""The dVAE objective of DALL·E: logit-Laplace reconstruction + beta * KL to the uniform prior, and its schedules.

Per image, the (negative) ELBO is ``sum_pixels NLL(x | z) + beta * sum_positions KL(q(z|x) || U(K))``.
:class:`DVAELoss` divides both sums by the number of sub-pixels (C*H*W), so ``rec_loss`` is the NLL
per sub-pixel and ``kl_weight`` is the paper's beta unchanged (the logged ``kl`` is per grid position).
Each grid position covers ``C * f^2`` sub-pixels (192 for DALL·E's f8, 48 at f4), so the same beta
presses harder per position on a finer grid: beta 6.6 at f8 is ~1.65 at f4 per sub-pixel of NLL.
The KL weight warms up from 0 and the Gumbel-softmax temperature anneals from 1 to 1/16, both
with cosine schedules in the paper (beta to 6.6 over 5000 updates, tau over 150k updates).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from t2i.models.dvae import LOGIT_LAPLACE_EPS, map_pixels, unmap_pixels

__all__ = ["Anneal", "DVAELoss", "anneal", "kl_to_uniform", "logit_laplace_nll", "map_pixels", "unmap_pixels"]

KINDS = ("linear", "cosine", "exp", "constant")


def anneal(step: int, start: float, end: float, steps: int, kind: str = "cosine") -> float:
    """A value going from ``start`` (step 0) to ``end`` (step >= ``steps``), then held.

    ``linear`` and ``cosine`` interpolate (cosine: ``end + (start - end) * (1 + cos(pi t)) / 2``);
    ``exp`` interpolates geometrically (``start * (end / start) ** t``; both must be > 0);
    ``constant`` is ``end`` throughout.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown schedule kind {kind!r}; choose one of {', '.join(KINDS)}")
    if kind == "constant" or steps <= 0:
        return float(end)
    t = min(max(step / steps, 0.0), 1.0)
    if kind == "linear":
        return start + (end - start) * t
    if kind == "cosine":
        return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))
    if start <= 0 or end <= 0:
        raise ValueError(f"an exp schedule needs positive start and end, got {start} and {end}")
    return start * (end / start) ** t


class Anneal:
    """A configured :func:`anneal`: ``Anneal(1.0, 1 / 16, 150_000, "cosine")(step)``."""

    def __init__(self, start: float, end: float, steps: int, kind: str = "cosine"):
        anneal(0, start, end, steps, kind)  # validates
        self.start, self.end, self.steps, self.kind = float(start), float(end), int(steps), kind

    def __call__(self, step: int) -> float:
        return anneal(step, self.start, self.end, self.steps, self.kind)

    def __repr__(self) -> str:
        return f"Anneal({self.start} -> {self.end} over {self.steps} steps, {self.kind})"


def logit_laplace_nll(x: torch.Tensor, mu: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Per-pixel ``-log p(x)`` for mapped pixels ``x`` in (0, 1) under the logit-Laplace distribution.

    ``logit(x) ~ Laplace(mu, b)``; in ``x`` space the density is
    ``p(x) = exp(-|logit(x) - mu| / b) / (2 b x (1 - x))``. ``log_b`` is ``ln b``.
    """
    x = x.float()
    mu, log_b = mu.float(), log_b.float()
    return (math.log(2.0) + log_b + torch.log(x) + torch.log1p(-x)
            + (torch.logit(x) - mu).abs() * torch.exp(-log_b))


def kl_to_uniform(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``KL(q || U(K)) = sum_k q_k log(q_k K)`` with ``q = softmax(logits)`` along ``dim``, averaged over
    every other position. 0 for a uniform ``q``, ``log K`` for a one-hot one."""
    logq = F.log_softmax(logits.float(), dim=dim)
    k = logits.shape[dim]
    return (logq.exp() * (logq + math.log(k))).sum(dim).mean()


class DVAELoss(nn.Module):
    """Reconstruction + scheduled KL for the dVAE; also owns the Gumbel-softmax temperature schedule.

    ``rec_loss``: ``logit_laplace`` (the paper) or ``mse`` (on [0, 1] pixels of the decoded mean; the KL
    weight then needs retuning, as the MSE is on another scale than the NLL). ``dequantize`` adds uniform
    noise of one 8-bit step to the target pixels of the logit-Laplace NLL (the usual treatment of a
    continuous density on 8-bit data: otherwise the NLL of exactly repeated values, e.g. flat synthetic
    backgrounds, is unbounded below as the predicted scale shrinks).
    """

    def __init__(self, rec_loss: str = "logit_laplace", eps: float = LOGIT_LAPLACE_EPS, kl_weight: float = 6.6,
                 kl_warmup_steps: int = 5000, kl_schedule: str = "cosine", temperature_start: float = 1.0,
                 temperature_end: float = 1 / 16, temperature_steps: int = 150_000,
                 temperature_schedule: str = "cosine", dequantize: bool = False):
        super().__init__()
        if rec_loss not in ("logit_laplace", "mse"):
            raise ValueError(f"rec_loss must be 'logit_laplace' or 'mse', got {rec_loss!r}")
        self.rec_loss, self.eps, self.dequantize = rec_loss, eps, dequantize
        self.kl_weight = Anneal(0.0, kl_weight, kl_warmup_steps, kl_schedule)
        self.temperature = Anneal(temperature_start, temperature_end, temperature_steps, temperature_schedule)

    def reconstruction(self, images: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
        """Mean per-sub-pixel reconstruction loss of images in [-1, 1] given decoder outputs [B, 2C, H, W]."""
        c = images.shape[1]
        x01 = (images.float() + 1) / 2
        if self.dequantize and self.rec_loss == "logit_laplace":
            x01 = (x01 * 255 + torch.rand_like(x01)) / 256
        mu, log_b = stats[:, :c], stats[:, c: 2 * c]
        if self.rec_loss == "mse":
            # unclamped unmap of the decoded mean, so saturated pixels keep their gradient
            return F.mse_loss((torch.sigmoid(mu.float()) - self.eps) / (1 - 2 * self.eps), x01)
        return logit_laplace_nll(map_pixels(x01, self.eps), mu, log_b).mean()

    def forward(self, images: torch.Tensor, stats: torch.Tensor, logits: torch.Tensor, step: int = 0
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss, logs)``; logs hold ``rec_loss``, ``kl`` (nats per grid position) and ``kl_weight``."""
        rec = self.reconstruction(images, stats)
        kl = kl_to_uniform(logits)
        beta = self.kl_weight(step)
        positions_per_subpixel = logits.shape[-2] * logits.shape[-1] / images[0].numel()
        loss = rec + beta * positions_per_subpixel * kl
        return loss, {"rec_loss": rec.detach(), "kl": kl.detach(), "kl_weight": torch.tensor(beta)}
