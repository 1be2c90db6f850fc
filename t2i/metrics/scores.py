"""FID, IS, CLIPScore and FD-CLIP for generated images, as torchmetrics states that sync across
DDP ranks, with the real-image statistics cached on disk.

Images arrive as the pipeline's float ``[N, 3, H, W]`` in [-1, 1] and are quantised to ``uint8``
once (what a saved PNG holds), so scores computed here equal torchmetrics on the saved images.

- ``fid``: ``FrechetInceptionDistance`` over any extractor (:mod:`t2i.metrics.features`).
- ``is_mean`` / ``is_std``: torchmetrics' ``InceptionScore`` arithmetic over a logits extractor
  (``splits`` splits, permutation seeded), with the logits gathered from every rank in caption order
  (:class:`InceptionScore`), so ranks may see different numbers of batches and the value equals one
  process's.
- ``clip_score``: CLIPScore as torchmetrics defines it, ``mean(max(100 * cos(image, caption), 0))``,
  with any reranker backend.
- ``fd_clip``: the Fréchet distance in that CLIP's normalised image-embedding space.

Real statistics (feature sums and outer-product sums) do not depend on the model being evaluated:
:class:`RealStatsCache` stores them under a key of dataset, split, resolution, number of images and
each extractor's weights hash, so a second run (or the next validation epoch) does not recompute them.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torchmetrics import Metric
from torchmetrics.image.fid import FrechetInceptionDistance

from t2i.metrics.features import CLIPFeatures, fingerprint, weights_hash

REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> uint8 [0, 255], rounded as ``torchvision.utils.save_image`` does."""
    if images.dtype == torch.uint8:
        return images
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8)


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[n, ...]`` from every rank, concatenated in rank order; ranks may hold different ``n``
    (zero included; the trailing shape must agree). Collective under torch.distributed, ``x`` itself
    otherwise."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    counts = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, n)
    counts = [int(c) for c in counts]
    padded = x.new_zeros((max(counts), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.zeros_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:c] for part, c in zip(parts, counts)])


class FID(FrechetInceptionDistance):
    """torchmetrics' FID (sum states, so uneven batch counts per rank are fine), also on a rank that saw
    no images (torchmetrics sets the result dtype only in ``update``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.orig_dtype = torch.float32


class InceptionScore(Metric):
    """torchmetrics' ``InceptionScore`` arithmetic (softmax of the logits, ``splits`` chunks of a seeded
    permutation, ``exp(mean KL(p(y|x) || p(y)))`` per chunk; mean and std over chunks), DDP-safe: each
    rank keeps its logits with the global index of every image, ``compute`` gathers them all with padding
    (any number of batches per rank, none included) and restores the index order, so N processes give
    the one-process value. ``update(images, index)``: ``index`` is the first image's position in the
    whole set (default: this rank's running count)."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, feature: nn.Module, splits: int = 10, seed: int = 0, **kwargs):
        super().__init__(sync_on_compute=False, **kwargs)  # compute gathers itself (uneven sizes)
        self.inception = feature
        self.splits, self.seed = int(splits), int(seed)
        classes = getattr(feature, "num_features", None)
        if classes is None:
            with torch.no_grad():
                classes = feature(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).shape[-1]
        self.num_classes = int(classes)
        self.add_state("logits", [], dist_reduce_fx=None)
        self.add_state("index", [], dist_reduce_fx=None)

    def update(self, images: torch.Tensor, index: int | None = None) -> None:
        logits = self.inception(images).float()
        start = sum(len(i) for i in self.index) if index is None else int(index)
        self.logits.append(logits)
        self.index.append(torch.arange(start, start + len(logits), device=logits.device))

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        local = torch.cat(self.logits) if self.logits else torch.zeros(0, self.num_classes, device=self.device)
        where = torch.cat(self.index) if self.index else torch.zeros(0, dtype=torch.long, device=self.device)
        logits, where = gather_rows(local), gather_rows(where)
        logits = logits[where.argsort(stable=True)]
        perm = torch.randperm(len(logits), generator=torch.Generator().manual_seed(self.seed))
        logits = logits[perm.to(logits.device)]
        prob, log_prob = logits.softmax(dim=1), logits.log_softmax(dim=1)
        kl = []
        for p, lp in zip(prob.chunk(self.splits, dim=0), log_prob.chunk(self.splits, dim=0)):
            marginal = p.mean(dim=0, keepdim=True)
            kl.append((p * (lp - marginal.log())).sum(dim=1).mean().exp())
        kl = torch.stack(kl)
        return kl.mean(), kl.std()


class CLIPScore(Metric):
    """``mean(max(100 * cos(image, caption), 0))`` over all updates (and ranks)."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, clip, **kwargs):
        super().__init__(**kwargs)
        self.clip = clip
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, images: torch.Tensor, captions: list[str]) -> None:
        x = images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images.float()
        cos = (self.clip.image_features(x).float() * self.clip.text_features(list(captions)).float()).sum(-1)
        self.total += (100 * cos.clamp(min=0)).sum().to(self.total)
        self.count += len(captions)

    def compute(self) -> torch.Tensor:
        """The mean over every rank's images; NaN when no rank scored any."""
        if int(self.count) == 0:
            return torch.tensor(float("nan"))
        return (self.total / self.count).float()


class GenerationScores(nn.Module):
    """The metrics bundle. ``extractor``: FID features (None: no FID); ``logits``: IS classifier
    (None: no IS); ``clip``: a reranker for CLIPScore and, with ``fd_clip``, FD-CLIP."""

    def __init__(self, extractor: nn.Module | None = None, logits: nn.Module | None = None, clip=None,
                 fd_clip: bool = True, is_splits: int = 10, seed: int = 0):
        super().__init__()
        self.frechet = nn.ModuleDict()
        if extractor is not None:
            self.frechet["fid"] = FID(feature=extractor, reset_real_features=False)
        if clip is not None and fd_clip:
            self.frechet["fd_clip"] = FID(feature=CLIPFeatures(clip), reset_real_features=False)
        self.inception_score = InceptionScore(logits, is_splits, seed) if logits is not None else None
        self.clip_score = CLIPScore(clip) if clip is not None else None
        self.seed = seed
        self.real_loaded = False
        self._description = None

    def describe(self) -> dict:
        """What ``metrics.json`` and cache keys record about each extractor (name and weights hash);
        hashed once, since the extractors are frozen."""
        if self._description is None:
            out = {name: fingerprint(m.inception) for name, m in self.frechet.items()}
            if self.inception_score is not None:
                out["is"] = fingerprint(self.inception_score.inception)
            if self.clip_score is not None:
                out["clip_score"] = out.get("fd_clip") or {"name": "clip",
                                                           "weights_sha256": weights_hash(self.clip_score.clip)}
            self._description = out
        return self._description

    @torch.no_grad()
    def update_real(self, images: torch.Tensor) -> None:
        x = to_uint8(images)
        for m in self.frechet.values():
            m.update(x, real=True)

    @torch.no_grad()
    def update_fake(self, images: torch.Tensor, captions: list[str] | None = None, start: int | None = None) -> None:
        """``start``: the batch's position among all captions (orders the IS logits across ranks)."""
        x = to_uint8(images)
        for m in self.frechet.values():
            m.update(x, real=False)
        if self.inception_score is not None:
            self.inception_score.update(x, start)
        if self.clip_score is not None and captions is not None:
            self.clip_score.update(x, captions)

    @torch.no_grad()
    def compute(self) -> dict[str, float]:
        out = {name: float(m.compute()) for name, m in self.frechet.items()}
        if self.inception_score is not None:
            mean, std = self.inception_score.compute()  # permutes with its own generator, seeded
            out["is_mean"], out["is_std"] = float(mean), float(std)
        if self.clip_score is not None:  # computed on every rank (a collective), reported when any rank scored
            value = float(self.clip_score.compute())
            if value == value:
                out["clip_score"] = value
        return out

    def reset(self) -> None:
        """Forget the fake images (the real statistics stay)."""
        for m in self.frechet.values():
            m.reset()
        for m in (self.inception_score, self.clip_score):
            if m is not None:
                m.reset()

    def real_count(self) -> int:
        return int(next(iter(self.frechet.values())).real_features_num_samples) if self.frechet else 0

    @torch.no_grad()
    def real_state(self) -> dict:
        """Real statistics summed over all ranks (a collective call under DDP)."""
        state = {}
        for name, m in self.frechet.items():
            with m.sync_context(should_sync=True, distributed_available=m.distributed_available_fn):
                state[name] = {k: getattr(m, k).detach().cpu().clone() for k in REAL_STATES}
        return state

    @torch.no_grad()
    def load_real_state(self, state: dict, rank: int = 0) -> None:
        """Install cached totals; under DDP only rank zero holds them (ranks are summed at compute)."""
        for name, m in self.frechet.items():
            for k in REAL_STATES:
                v = state[name][k].to(getattr(m, k).device)
                setattr(m, k, v if rank == 0 else torch.zeros_like(v))
        self.real_loaded = True


class RealStatsCache:
    """Real-image statistics on disk, one file per key (dataset, split, resolution, count, extractors)."""

    def __init__(self, directory, **key):
        self.key = key
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
        name = "-".join(str(key.get(k, "")) for k in ("dataset", "split", "resolution")).strip("-") or "stats"
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[-80:]
        self.path = Path(str(directory)).expanduser() / f"{name}-{digest}.pt"

    def load(self) -> dict | None:
        if not self.path.is_file():
            return None
        try:
            blob = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception:
            return None  # a half-written or foreign file: recompute and overwrite
        return blob["state"] if blob.get("key") == json.loads(json.dumps(self.key, default=str)) else None

    def save(self, state: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save({"key": json.loads(json.dumps(self.key, default=str)), "state": state}, tmp)
        tmp.replace(self.path)  # atomic: a killed writer never leaves a truncated cache file
