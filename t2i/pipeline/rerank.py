"""Reranking generated images with CLIP: ``score(clip, images, texts)`` and ``rerank(clip, images, text, top)``.

``clip`` is a :class:`Reranker` (our CLIP checkpoint with its own text tokenizer), an open_clip or
Chinese-CLIP model from a local file (:mod:`t2i.pretrained.clip`), all from
:func:`load_reranker`, or anything with ``score(images, texts: list[str]) -> Tensor[N]`` and a
``device``. The loaded backends also give L2-normalised ``image_features(images)`` and
``text_features(texts)`` (``score`` is their dot product), which evaluation uses for CLIPScore and
FD-CLIP. Images are ``[N, 3, H, W]`` in [-1, 1], the pipeline's convention; each backend applies
its own resizing. Work is batched and runs on the reranker's device; results come back on the CPU.

:class:`Reranking` is a pipeline's ranking step: a CLIP, the caption likelihood, or both combined.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from t2i.data.tokenizer import TextTokenizer, tokenizer_from_checkpoint
from t2i.errors import ConfigError, T2IError, reason
from t2i.models.clip import CLIP


class Reranker(nn.Module):
    """Our CLIP plus the text tokenizer it was trained with."""

    def __init__(self, clip: CLIP, tokenizer: TextTokenizer):
        super().__init__()
        self.clip, self.tokenizer = clip.eval(), tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.clip.parameters()).device

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(images.to(self.device).float())

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        return self.clip.encode_text(self.tokenizer.encode(list(texts), self.clip.text_len).to(self.device))

    def score(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        return (self.image_features(images) * self.text_features(texts)).sum(-1)


BACKENDS = ("t2i", "open_clip", "cn_clip")


def load_reranker(path, backend: str = "t2i", model_name: str | None = None, map_location="cpu") -> nn.Module:
    """A reranker from a local file. ``backend="t2i"``: a ``t2i-train experiment=*_clip`` checkpoint
    (weights, sizes and the text tokenizer all come from the file); ``"open_clip"``: open_clip
    architecture ``model_name`` with weights from ``path``; ``"cn_clip"``: Chinese-CLIP ``model_name``
    (``ViT-B-16``, ...) from a local ``clip_cn_*.pt`` (both in :mod:`t2i.pretrained.clip`)."""
    if backend in ("open_clip", "cn_clip"):
        from t2i.pretrained.clip import CNCLIPReranker, OpenCLIPReranker

        if not model_name:
            raise ConfigError(f"rerank.backend={backend} needs rerank.model_name (e.g. "
                              f"{'ViT-B-32' if backend == 'open_clip' else 'ViT-B-16'})")
        return (OpenCLIPReranker if backend == "open_clip" else CNCLIPReranker)(model_name, path)
    if backend != "t2i":
        raise ConfigError(f"rerank.backend={backend!r} is unknown; use one of {list(BACKENDS)}")
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise T2IError(f"rerank.ckpt={path}: no such file (a CLIP checkpoint from `t2i-train experiment=*_clip`)")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:
        raise T2IError(f"rerank.ckpt={path} cannot be read ({reason(e)})") from None
    hp = ckpt.get("hyper_parameters") or {}
    if "clip" not in str(hp.get("_target_", "")).lower() and "logit_scale" not in str(list(ckpt.get("state_dict", {}))):
        raise T2IError(f"rerank.ckpt={path} is not a CLIP checkpoint (train one with experiment=*_clip)")
    tok = tokenizer_from_checkpoint(ckpt)
    if tok is None:
        raise T2IError(f"rerank.ckpt={path} carries no text tokenizer (was it trained by t2i-train?)")
    clip = CLIP(**hp["model"])
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    clip.load_state_dict(state)
    return Reranker(clip, tok)


def _device(clip) -> torch.device:
    d = getattr(clip, "device", None)
    return d if isinstance(d, torch.device) else torch.device("cpu")


@torch.no_grad()
def score(clip, images: torch.Tensor, texts, batch_size: int = 256) -> torch.Tensor:
    """Similarity of each (image, text) pair, ``[N]`` on the CPU; ``texts`` is one string for all
    images or a list of ``N`` strings."""
    if isinstance(texts, str):
        texts = [texts] * len(images)
    if len(texts) != len(images):
        raise ValueError(f"score: {len(images)} images but {len(texts)} texts")
    out = [clip.score(images[i:i + batch_size], texts[i:i + batch_size]).float().cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.zeros(0)


def rerank(clip, images: torch.Tensor, text: str, top: int | None = None,
           batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices, scores)`` of the ``top`` images (all when None) for one caption, best first."""
    s = score(clip, images, text, batch_size)
    order = s.argsort(descending=True)
    if top is not None:
        order = order[:top]
    return order, s[order]


# -- the reranking step of a pipeline: CLIP, the caption likelihood, or both ---------------------------------
@dataclass
class Ranked:
    """One prompt's kept candidates, best first: ``order`` (indices among those drawn), the ranking
    ``scores`` and each scorer's values (None where a scorer is not used)."""

    order: list[int]
    scores: list
    clip: list
    caption: list
    combined: list


class Reranking:
    """How a pipeline orders a prompt's candidates: by a CLIP (``clip``), by the transformer's caption
    likelihood (``by_caption``), or by both (``combine``: rank_sum | zsum, :mod:`t2i.pipeline.caption_rerank`).
    With neither, candidates keep the order they were drawn in."""

    def __init__(self, clip=None, by_caption: bool = False, combine: str | None = None, source=None, backend="t2i"):
        self.clip, self.by_caption, self.combine, self.source, self.backend = clip, by_caption, combine, source, backend

    @property
    def active(self) -> bool:
        return self.clip is not None or self.by_caption or (self.source is not None and self.backend != "caption")

    @property
    def name(self) -> str | None:
        if not self.active:
            return None
        return self.combine or ("caption" if self.by_caption else "clip")

    @classmethod
    def check(cls, reranker=None, backend: str = "t2i", combine=None) -> Reranking:
        """The reranking asked for, checked before any model loads (one ConfigError naming the key):
        ``reranker`` a CLIP file or module, or ``"caption"``; ``backend`` t2i | open_clip | cn_clip | caption."""
        from t2i.pipeline.caption_rerank import check_combine

        if reranker == "caption":
            reranker, backend = None, "caption"
        if backend == "caption":
            if combine not in (None, "null", "none"):
                raise ConfigError(f"rerank.combine={combine} takes its CLIP from rerank.backend/rerank.ckpt: set "
                                  f"rerank.backend to the CLIP's kind (t2i, open_clip, cn_clip), not caption")
            if reranker is not None:
                raise ConfigError(f"rerank.backend=caption ranks by the caption likelihood, but rerank.ckpt={reranker} "
                                  f"is a CLIP: drop rerank.ckpt, or rank by both with rerank.backend=<the CLIP's "
                                  f"kind> rerank.combine=rank_sum")
            return cls(by_caption=True, backend="caption")
        if backend not in BACKENDS:
            raise ConfigError(f"rerank.backend={backend!r} is unknown; use one of {list(BACKENDS) + ['caption']}")
        has_clip = reranker is not None and reranker != ""
        combine = check_combine(combine, has_clip)
        if isinstance(reranker, nn.Module):
            return cls(clip=reranker, by_caption=combine is not None, combine=combine, backend=backend)
        return cls(by_caption=combine is not None, combine=combine, source=reranker if has_clip else None,
                   backend=backend)

    def load(self, model, model_name=None, device="cpu", where: str = "ckpt") -> Reranking:
        """The CLIP file loaded on ``device`` (once the transformer is known to be usable), and the
        transformer checked for caption scoring when that is asked for."""
        from t2i.pipeline.caption_rerank import check_captioning

        if self.by_caption:
            check_captioning(model, where)
        clip = self.clip
        if clip is None and self.source is not None:
            clip = load_reranker(self.source, self.backend, model_name)
        if clip is not None:
            clip = clip.to(device)
        return Reranking(clip, self.by_caption, self.combine, self.source, self.backend)

    def caption_table(self, model, codes: torch.Tensor, text: torch.Tensor, n: int) -> torch.Tensor | None:
        """``[B, n]`` caption log-likelihoods of the candidates (on the codes, before any decoding)."""
        if not self.by_caption:
            return None
        from t2i.pipeline.caption_rerank import caption_scores

        return caption_scores(model, codes, text.repeat_interleave(n, 0)).cpu().view(text.shape[0], -1)

    def rank(self, images: torch.Tensor, prompts: list[str], caption: torch.Tensor | None = None,
             top: int | None = None) -> list[Ranked]:
        """The candidates of ``prompts`` (``images [B * n, 3, H, W]`` in [-1, 1], ``n`` per prompt, in order)
        ranked best first, ``top`` kept per prompt; ``caption``: the ``[B, n]`` table of :meth:`caption_table`."""
        b = len(prompts)
        n = len(images) // b
        clip = score_table(self.clip, images, prompts, n).cpu() if self.clip is not None else None
        if clip is None and caption is None:
            order, combined = torch.arange(n).expand(b, n), None
        else:
            order, combined = rank_table(clip, caption, self.combine, "caption" if self.by_caption else "clip")
        out = []
        for k in range(b):
            ranked = order[k][:top] if top is not None else order[k]
            clip_s, cap_s, comb_s = (t[k][ranked].tolist() if t is not None else [None] * len(ranked)
                                     for t in (clip, caption, combined))
            scores = comb_s if self.combine else clip_s if clip is not None else cap_s
            out.append(Ranked(ranked.tolist(), scores, clip_s, cap_s, comb_s))
        return out


def score_table(clip, images: torch.Tensor, captions: list[str], n: int, chunk: int = 64) -> torch.Tensor:
    """``[B, n]`` CLIP scores of ``n`` candidates per caption (``images [B * n, 3, H, W]`` in [-1, 1]), on the
    images' device, in chunks of ``chunk`` images."""
    texts = [c for c in captions for _ in range(n)]
    return torch.cat([clip.score(images[i:i + chunk], texts[i:i + chunk]).float()
                      for i in range(0, len(images), chunk)]).view(len(captions), n)


def rank_table(clip: torch.Tensor | None, caption: torch.Tensor | None, combine: str | None = None,
               by: str = "clip") -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(order [B, n] best first, combined or None)`` from the score tables: ``combine`` ranks by both;
    otherwise ``by`` (``clip`` | ``caption``) names the table that ranks when both are there (the other is
    only recorded)."""
    from t2i.pipeline.caption_rerank import rank_candidates

    if combine is not None:
        return rank_candidates(clip.to(caption.device), caption, combine)
    if by == "caption" and caption is not None:
        return rank_candidates(None, caption)
    return rank_candidates(clip, None) if clip is not None else rank_candidates(None, caption)
