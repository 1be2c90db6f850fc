"""Discrete bottlenecks for the VQGAN: nearest-neighbour VQ (with the ViT-VQGAN and VQ-VAE-2 options) and
Gumbel-softmax, plus codebook-usage statistics.

Both quantizers map an encoder output ``z [B, C, h, w]`` to ``(z_q [B, C, h, w], loss, info)`` with
``info["codes"]`` (LongTensor ``[B, h, w]``) and ``info["perplexity"]``. Parameter names follow
taming-transformers (``embedding`` for VQ, ``proj``/``embed`` for Gumbel) so public checkpoints load.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import nn
from torchmetrics import Metric


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def perplexity_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the code histogram: 1 when a single code is used, ``n_embed`` when all are used evenly."""
    p = counts.float() / counts.sum().clamp_min(1)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-10))).sum())


def codebook_usage(codes: torch.Tensor, n_embed: int) -> tuple[torch.Tensor, float]:
    """``(perplexity, used_fraction)`` of one batch of codes."""
    counts = torch.bincount(codes.flatten(), minlength=n_embed)
    return perplexity_from_counts(counts), (counts > 0).float().mean().item()


class CodebookUsage(Metric):
    """Code histogram accumulated over an epoch; ``compute() -> {"perplexity", "dead_codes"}``.

    ``dead_codes`` is the fraction of the codebook never chosen. The state is a tensor of counts summed
    across DDP ranks, so the numbers describe the whole validation set.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, n_embed: int, **kwargs):
        super().__init__(**kwargs)
        self.n_embed = n_embed
        self.add_state("counts", default=torch.zeros(n_embed, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, codes: torch.Tensor) -> None:
        self.counts += torch.bincount(codes.flatten().long(), minlength=self.n_embed)

    def compute(self) -> dict[str, torch.Tensor]:
        return {"perplexity": perplexity_from_counts(self.counts), "dead_codes": (self.counts == 0).float().mean()}


HOST_CHECK_ON_CPU = True  # tests switch it off to run the accelerator's sync-free path on the CPU


class VectorQuantizer(nn.Module):
    """Nearest-codebook quantizer with a straight-through gradient (VQ-VAE / VQGAN).

    Loss (``sg`` = stop-gradient, means over all elements):

    * default (``legacy=False``, the VQ-VAE paper): ``||sg[z] - e||^2 + beta * ||z - sg[e]||^2``, i.e. the
      codebook term moves the codes towards the encoder outputs with weight 1 and the commitment term pulls
      the encoder towards its codes with weight ``beta``.
    * ``legacy=True`` reproduces taming-transformers' ``VectorQuantizer2(legacy=True)`` (the default their
      ``VQModel`` builds) and their original ``VectorQuantizer``: ``beta * ||sg[z] - e||^2 +
      ||z - sg[e]||^2`` -- beta scales the *codebook* term and the commitment term gets weight 1. Both
      squared distances have the same value in the forward pass, so the loss *value* is ``(1 + beta) * mse``
      either way; only the gradients differ (codebook gradient scaled by beta, encoder gradient by 1/beta
      relative to the correct form).

    Options: ``l2_normalize`` looks codes up by cosine similarity (z and codebook L2-normalised, ViT-VQGAN);
    ``codebook_dim`` projects z from ``embed_dim`` to a low-dimensional lookup space and back (ViT-VQGAN
    factorized codes; losses are computed in that space); ``ema_decay`` updates the codebook in training by
    exponential moving averages of the assigned encoder outputs (Laplace-smoothed cluster sizes) instead of
    by gradients -- the loss is then only the commitment term (weight beta, or 1 with ``legacy``);
    ``restart_dead=N`` re-initialises, at the start of a training forward, every code unused for N
    consecutive training forwards from random encoder outputs of the current batch (done before the lookup,
    so autograd never sees an in-place codebook change).

    DDP: EMA statistics and usage counts are all-reduced and restart vectors are broadcast from rank 0, so
    every rank keeps the same codebook (this assumes all ranks call ``forward`` in lockstep, as DDP does).
    """

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25, legacy: bool = False,
                 l2_normalize: bool = False, codebook_dim: int | None = None, ema_decay: float | None = None,
                 restart_dead: int = 0, ema_eps: float = 1e-5):
        super().__init__()
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"VectorQuantizer: ema_decay must be in (0, 1) or None, got {ema_decay}")
        if restart_dead < 0:
            raise ValueError(f"VectorQuantizer: restart_dead must be >= 0 (0 = off), got {restart_dead}")
        self.n_embed, self.embed_dim, self.beta, self.legacy = n_embed, embed_dim, beta, legacy
        self.l2_normalize, self.ema_decay, self.ema_eps = l2_normalize, ema_decay, ema_eps
        self.restart_dead = restart_dead
        self.codebook_dim = codebook_dim or embed_dim
        self.embedding = nn.Embedding(n_embed, self.codebook_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)
        low_dim = codebook_dim is not None and codebook_dim != embed_dim
        self.proj_in = nn.Linear(embed_dim, self.codebook_dim) if low_dim else nn.Identity()
        self.proj_out = nn.Linear(self.codebook_dim, embed_dim) if low_dim else nn.Identity()
        if ema_decay is not None:
            self.embedding.weight.requires_grad_(False)  # moved by EMA only
            self.register_buffer("ema_cluster_size", torch.ones(n_embed))
            self.register_buffer("ema_embed_sum", self.embedding.weight.detach().clone())
        if restart_dead:
            self.register_buffer("unused_steps", torch.zeros(n_embed, dtype=torch.long))

    def codebook(self) -> torch.Tensor:
        """The code vectors as used for lookup, ``[n_embed, codebook_dim]``."""
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_normalize else w

    def _to_lookup_space(self, z: torch.Tensor) -> torch.Tensor:  # [B, C, h, w] -> [B, h, w, d]
        z = self.proj_in(rearrange(z, "b c h w -> b h w c"))
        return F.normalize(z, dim=-1) if self.l2_normalize else z

    @torch.no_grad()
    def _nearest(self, flat: torch.Tensor) -> torch.Tensor:
        flat, cb = flat.float(), self.codebook().float()
        d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ cb.t() + cb.pow(2).sum(1)
        return d.argmin(1)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest code indices ``[B, h, w]``; pure (never updates the codebook)."""
        zl = self._to_lookup_space(z)
        return self._nearest(zl.reshape(-1, zl.shape[-1])).view(zl.shape[:-1])

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Code indices ``[B, h, w]`` -> quantized latents ``[B, embed_dim, h, w]``."""
        return rearrange(self.proj_out(F.embedding(codes, self.codebook())), "b h w c -> b c h w")

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        zl = self._to_lookup_space(z)
        flat = zl.reshape(-1, zl.shape[-1])
        if self.training and self.restart_dead:
            self._restart_dead_codes(flat.detach())
        codes = self._nearest(flat.detach())
        e = F.embedding(codes, self.codebook()).view_as(zl)

        commitment = F.mse_loss(zl, e.detach())
        w_codebook, w_commit = (self.beta, 1.0) if self.legacy else (1.0, self.beta)
        if self.ema_decay is None:
            codebook_loss = F.mse_loss(zl.detach(), e)
            loss = w_codebook * codebook_loss + w_commit * commitment
        else:
            codebook_loss = torch.zeros_like(commitment)
            loss = w_commit * commitment

        counts = torch.bincount(codes, minlength=self.n_embed)
        if self.training and self.ema_decay is not None:
            self._ema_update(flat.detach(), codes, counts)
        if self.training and self.restart_dead:
            self._track_usage(counts)

        z_q = zl + (e - zl).detach()  # straight-through: d z_q / d z = identity
        z_q = rearrange(self.proj_out(z_q), "b h w c -> b c h w")
        info = {"codes": codes.view(zl.shape[:-1]), "perplexity": perplexity_from_counts(counts),
                "commitment_loss": commitment.detach(), "codebook_loss": codebook_loss.detach()}
        return z_q, loss, info

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, codes: torch.Tensor, counts: torch.Tensor) -> None:
        sums = torch.zeros_like(self.ema_embed_sum).index_add_(0, codes, flat.to(self.ema_embed_sum.dtype))
        counts = counts.to(self.ema_cluster_size.dtype)
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        decay = self.ema_decay
        self.ema_cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
        self.ema_embed_sum.mul_(decay).add_(sums, alpha=1 - decay)
        n = self.ema_cluster_size.sum()
        size = (self.ema_cluster_size + self.ema_eps) / (n + self.n_embed * self.ema_eps) * n  # Laplace smoothing
        self.embedding.weight.copy_(self.ema_embed_sum / size[:, None])

    @torch.no_grad()
    def _track_usage(self, counts: torch.Tensor) -> None:
        used = counts.clone()
        if _distributed():
            dist.all_reduce(used)
        self.unused_steps.add_(1).masked_fill_(used > 0, 0)

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor) -> None:
        """Every code unused for ``restart_dead`` forwards takes a random vector of this batch (distinct
        vectors while the batch has enough). On an accelerator this is done with masks on the device, a
        candidate for every code, so that a training step never waits to learn how many codes are dead
        (it then draws a permutation every step). On the CPU, where reading the count costs nothing, a
        step with no dead code returns at once and leaves the RNG alone, so the random stream (and the
        Shapes demo's trained tokenizer) does not depend on how often the check runs. Under DDP the
        candidates come from rank 0 (``unused_steps`` is all-reduced, so every rank takes the same branch)."""
        dead = (self.unused_steps >= self.restart_dead)[:, None]
        if flat.device.type == "cpu" and HOST_CHECK_ON_CPU and not dead.any():
            return  # on the CPU the read is free: draw from the RNG only for a restart that happens
        perm = torch.randperm(flat.shape[0], device=flat.device)
        idx = perm[(dead[:, 0].long().cumsum(0) - 1).clamp_min(0) % flat.shape[0]]  # k-th dead code: perm[k]
        new = flat[idx].to(self.embedding.weight.dtype)
        if _distributed():
            dist.broadcast(new, src=0)
        self.embedding.weight.copy_(torch.where(dead, new, self.embedding.weight))
        if self.ema_decay is not None:
            self.ema_embed_sum.copy_(torch.where(dead, new.to(self.ema_embed_sum.dtype), self.ema_embed_sum))
            self.ema_cluster_size.masked_fill_(dead[:, 0], 1.0)
        self.unused_steps.masked_fill_(dead[:, 0], 0)


class GumbelQuantizer(nn.Module):
    """Gumbel-softmax quantizer (taming ``GumbelQuantize``): a 1x1 conv ``proj`` gives logits over the
    codebook ``embed``; training samples a (straight-through hard, or soft) one-hot with ``temperature``
    (a plain attribute, so a schedule can anneal it); eval takes the argmax. The loss is
    ``kl_weight * KL(softmax(logits) || uniform)``, averaged over positions.
    """

    def __init__(self, num_hiddens: int, embed_dim: int, n_embed: int, straight_through: bool = True,
                 kl_weight: float = 5e-4, temperature: float = 1.0):
        super().__init__()
        self.n_embed, self.embed_dim = n_embed, embed_dim
        self.straight_through, self.kl_weight, self.temperature = straight_through, kl_weight, temperature
        self.proj = nn.Conv2d(num_hiddens, n_embed, 1)
        self.embed = nn.Embedding(n_embed, embed_dim)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """Most likely code indices ``[B, h, w]``."""
        return self.proj(z).argmax(1)

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return rearrange(self.embed(codes), "b h w d -> b d h w")

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        logits = self.proj(z)
        if self.training:
            one_hot = F.gumbel_softmax(logits, tau=self.temperature, dim=1, hard=self.straight_through)
        else:
            one_hot = rearrange(F.one_hot(logits.argmax(1), self.n_embed), "b h w n -> b n h w")
        one_hot = one_hot.to(self.embed.weight.dtype)
        z_q = einsum(one_hot, self.embed.weight, "b n h w, n d -> b d h w")
        log_q = F.log_softmax(logits.float(), dim=1)
        kl = (log_q.exp() * (log_q + math.log(self.n_embed))).sum(1).mean()
        codes = one_hot.argmax(1)
        counts = torch.bincount(codes.flatten(), minlength=self.n_embed)
        info = {"codes": codes, "perplexity": perplexity_from_counts(counts), "kl": kl.detach()}
        return z_q, self.kl_weight * kl, info
