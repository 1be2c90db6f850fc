"""Reranking generated images with CLIP: ``score(clip, images, texts)`` and ``rerank(clip, images, text, top)``.

``clip`` is a :class:`Reranker` (our CLIP checkpoint with its own text tokenizer), an open_clip or
Chinese-CLIP model from a local file (:mod:`t2i.pretrained.clip`), all from
:func:`load_reranker`, or anything with ``score(images, texts: list[str]) -> Tensor[N]`` and a
``device``. The loaded backends also give L2-normalised ``image_features(images)`` and
``text_features(texts)`` (``score`` is their dot product), which evaluation uses for CLIPScore and
FD-CLIP. Images are ``[N, 3, H, W]`` in [-1, 1], the pipeline's convention; each backend applies
its own resizing. Work is batched and runs on the reranker's device; results come back on the CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from t2i.data.tokenizer import TextTokenizer, tokenizer_from_checkpoint
from t2i.errors import ConfigError, T2IError
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
        raise T2IError(f"rerank.ckpt={path} cannot be read ({type(e).__name__}: {e})") from None
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
