"""The evaluation loop shared by the :class:`~t2i.callbacks.generation_metrics.GenerationMetrics`
callback and ``t2i-eval``: captions -> ``num_candidates`` samples each -> optional rerank (CLIP, the
caption likelihood given the codes, or both: :mod:`t2i.pipeline.caption_rerank`) ->
one chosen image per caption -> metric updates.

Captions are processed in fixed batches of ``batch_size``; batch ``k`` is drawn from a generator
seeded with ``seed + k * batch_size`` and belongs to rank ``k % world_size``, so the same images are
drawn whatever the number of processes (the metric states are summed, IS logits gathered in caption
order, across ranks; ranks may get different numbers of batches). Sampling, decoding, reranking and
the extractors run on the model's device, under ``autocast`` when one is given (bf16 / fp16); images
leave the device only for what is written out.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from t2i.errors import ConfigError
from t2i.metrics.features import InceptionFeatures
from t2i.metrics.scores import GenerationScores


@dataclass
class Drawn:
    images: torch.Tensor                      # [B, 3, H, W] chosen sample per caption, [-1, 1]
    candidates: torch.Tensor                  # [B, n, 3, H, W]
    chosen: torch.Tensor                      # [B] index of the chosen candidate
    scores: torch.Tensor | None = None        # [B, n] CLIP scores when reranked
    caption_scores: torch.Tensor | None = None  # [B, n] caption log-likelihoods (rerank="caption" / combine)
    combined: torch.Tensor | None = None      # [B, n] the combination's value (combine; see t2i.pipeline.caption_rerank)


@torch.no_grad()
def draw(model, image_tokenizer, text_ids: torch.Tensor, captions: list[str], num_candidates: int = 1,
         clip=None, generator: torch.Generator | None = None, rerank: str = "clip", combine: str | None = None,
         **sample) -> Drawn:
    """``num_candidates`` samples per caption; the chosen one is CLIP's best (or the first drawn). Everything
    stays on the device the codes are drawn on (decoding and scoring in chunks of ``chunk`` images).
    ``rerank="caption"``: the best by caption likelihood given the codes (``model.caption_logprob``, no
    CLIP needed; CLIP, when given, is still scored and recorded); ``combine`` (``rank_sum`` / ``zsum``,
    needs ``clip``): by both (:mod:`t2i.pipeline.caption_rerank`)."""
    from t2i.pipeline.caption_rerank import caption_scores
    from t2i.pipeline.rerank import rank_table, score_table
    from t2i.sampling import generate

    chunk = 64
    codes = generate(model, text_ids, num_candidates, generator=generator, progress=False, **sample)
    images = torch.cat([image_tokenizer.decode(codes[i:i + chunk]) for i in range(0, len(codes), chunk)]).float()
    b = len(captions)
    cands = images.view(b, num_candidates, *images.shape[1:])
    rows = torch.arange(b, device=images.device)
    by_caption = num_candidates > 1 and (rerank == "caption" or combine is not None)
    cap = caption_scores(model, codes, text_ids.to(codes.device).repeat_interleave(num_candidates, 0),
                         chunk).view(b, num_candidates) if by_caption else None
    s = score_table(clip, images, captions, num_candidates, chunk) if clip is not None and num_candidates > 1 else None
    combined = None
    if s is not None or cap is not None:
        order, combined = rank_table(s, cap, combine, "caption" if rerank == "caption" else "clip")
        chosen = order[:, 0]
    else:
        chosen = torch.zeros(b, dtype=torch.long, device=images.device)
    return Drawn(cands[rows, chosen.to(images.device)], cands, chosen, s, cap, combined)


def build_scores(cfg: DictConfig | dict, clip=None, device="cpu", seed: int = 0) -> GenerationScores:
    """The metrics a ``metrics`` config block asks for::

        extractor: inception | clip | null | {_target_: ...} | an nn.Module   # FID features
        inception_score: true          # IS with the Inception logits (needs the Inception weights)
        is_extractor: null             # or another logits module ({_target_: ...} / nn.Module) for IS
        feature_extractor_weights_path: null                   # else the torch cache
        fd_clip: true                  # FD in the CLIP space (needs a clip)
        clip_score: true               # needs a clip
        is_splits: 10
    """
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg = dict(cfg)
    weights = cfg.get("feature_extractor_weights_path")

    def module(spec, what: str) -> nn.Module:
        if isinstance(spec, nn.Module):
            return spec
        if isinstance(spec, dict) and "_target_" in spec:
            from hydra.utils import instantiate

            return instantiate(spec)
        raise ConfigError(f"metrics.{what}={spec!r}: use inception, clip, null or a {{_target_: ...}} module")

    kind = cfg.get("extractor", "inception")
    extractor = None
    if kind == "inception":
        extractor = InceptionFeatures(weights, "2048", antialias=False)
    elif kind == "clip":
        if clip is None:
            raise ConfigError("metrics.extractor=clip needs a CLIP model (clip.ckpt)")
    elif kind is not None:
        extractor = module(kind, "extractor")
    logits = None
    if cfg.get("inception_score"):
        spec = cfg.get("is_extractor")
        logits = module(spec, "is_extractor") if spec is not None else \
            InceptionFeatures(weights, "logits_unbiased", antialias=False)
    use_fd = bool(cfg.get("fd_clip", True)) or kind == "clip"
    use_score = bool(cfg.get("clip_score", True))
    scores = GenerationScores(extractor, logits, clip if (use_fd or use_score) else None, fd_clip=use_fd,
                              is_splits=int(cfg.get("is_splits", 10)), seed=seed)
    if not use_score:
        scores.clip_score = None
    return scores.to(device)


@dataclass
class Loop:
    """One pass over ``captions`` (with optional real images or reference codes per caption)."""

    model: nn.Module
    image_tokenizer: nn.Module
    encode: callable                          # list[str] -> text ids [B, text_len]
    scores: GenerationScores
    clip: object = None
    num_candidates: int = 1
    batch_size: int = 16
    seed: int = 0
    sample: dict = field(default_factory=dict)
    rank: int = 0
    world_size: int = 1
    keep: int = 0                             # chosen images to keep (for the grid), from this rank
    autocast: torch.dtype | None = None       # bf16 / fp16 for sampling, decoding, CLIP and the extractors
    entities: callable = None                 # list[str] -> (ids [B, E], spans [B, E, 2]): a model with knowledge
    rerank: str = "clip"                      # clip | caption (likelihood of the caption given the codes)
    combine: str | None = None                # rank_sum | zsum: CLIP and caption likelihood together

    @torch.no_grad()
    def run(self, captions: list[str], real=None, hook=None) -> dict:
        """``real(start, end)`` gives the real images of captions ``start:end`` (skipped when the real
        statistics came from the cache); ``hook(start, captions, drawn)`` sees every drawn batch."""
        device = next(self.model.parameters()).device
        kept, starts, chosen, picked, picked_cap = [], [], [], [], []
        need_real = real is not None and not self.scores.real_loaded
        amp = torch.autocast(device.type, dtype=self.autocast) if self.autocast is not None else nullcontext()
        for k, start in enumerate(range(0, len(captions), self.batch_size)):
            if k % self.world_size != self.rank:
                continue
            end = min(start + self.batch_size, len(captions))
            batch = captions[start:end]
            gen = torch.Generator(device=device).manual_seed(self.seed + start)
            linked = {} if self.entities is None else {"entities": self.entities(batch)}
            with amp:
                out = draw(self.model, self.image_tokenizer, self.encode(batch).to(device), batch,
                           self.num_candidates, self.clip, gen, rerank=self.rerank, combine=self.combine,
                           **self.sample, **linked)
                self.scores.update_fake(out.images, batch, start)
                if need_real:
                    self.scores.update_real(real(start, end).to(device, non_blocking=True))
            if len(kept) < self.keep:
                kept.append(out.images[: self.keep - len(kept)].cpu())
            starts.append(start)
            chosen.append(out.chosen)
            if out.scores is not None:
                picked.append(out.scores.gather(1, out.chosen.view(-1, 1).to(out.scores.device)).squeeze(1))
            if out.caption_scores is not None:
                picked_cap.append(out.caption_scores.gather(1, out.chosen.view(-1, 1)).squeeze(1))
            if hook is not None:
                hook(start, batch, out)
        # per-caption records, read from the device once at the end
        chosen = torch.cat(chosen).tolist() if chosen else []
        picked = torch.cat(picked).tolist() if picked else [None] * len(chosen)
        picked_cap = torch.cat(picked_cap).tolist() if picked_cap else [None] * len(chosen)
        records, j = [], 0
        for start in starts:
            for i, c in enumerate(captions[start:start + self.batch_size]):
                records.append({"index": start + i, "caption": c, "seed": self.seed + start,
                                "chosen": chosen[j], "clip_score": picked[j], "caption_score": picked_cap[j]})
                j += 1
        return {"images": torch.cat(kept) if kept else None, "records": records}


def load_clip(cfg: DictConfig, device):
    """The ``clip`` block's reranker on ``device`` (None without ``clip.ckpt``)."""
    if not cfg.clip.ckpt:
        return None
    from t2i.pipeline.rerank import load_reranker

    return load_reranker(cfg.clip.ckpt, cfg.clip.backend, cfg.clip.get("model_name")).to(device)
