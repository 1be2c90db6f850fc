"""Feature extractors for Fréchet distances and the Inception Score.

Every extractor takes what torchmetrics' ``FrechetInceptionDistance(normalize=False)`` passes it:
``uint8`` images ``[N, 3, H, W]``, and has a ``num_features`` attribute.

- ``inception``: the standard FID network (torch-fidelity's ``inception-v3-compat``, 2048-d pool
  features; ``logits_unbiased`` for IS) with TF1-style bilinear resizing (``antialias=False``), so
  values match torch-fidelity and the original TF FID. Weights come from
  ``feature_extractor_weights_path`` or the torch cache, never from the network.
- ``clip``: L2-normalised CLIP image embeddings from any reranker backend (FD-CLIP).
- any ``nn.Module`` (tests use random-weight ones).

:func:`fingerprint` names an extractor for cache keys and for ``metrics.json``.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from t2i.data.codes import file_sha256
from t2i.errors import T2IError
from t2i.losses.perceptual import torch_cache_dir

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"


def find_inception(path: str | None = None) -> Path:
    """The FID Inception weights: ``path`` if given, else the torch cache; one clear error otherwise."""
    p = Path(str(path)).expanduser() if path else torch_cache_dir() / INCEPTION_FILE
    if not p.is_file():
        where = (f"feature_extractor_weights_path={path}" if path else
                 f"{p} (the torch cache, TORCH_HOME={os.environ.get('TORCH_HOME', '~/.cache/torch')})")
        raise T2IError(
            f"FID / IS need the Inception weights {INCEPTION_FILE}, not found at {where}. On a connected "
            f"machine download {INCEPTION_URL} and put it there, or pass "
            "metrics.feature_extractor_weights_path=<file>; or use metrics.extractor=clip (FD-CLIP)")
    return p


class InceptionFeatures(nn.Module):
    """torch-fidelity's FID Inception returning one output (``"2048"`` pool features or
    ``"logits_unbiased"`` for IS) from a local weights file."""

    def __init__(self, weights_path: str | None = None, output: str = "2048", antialias: bool = False):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.weights = find_inception(weights_path)
        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[output],
                                      feature_extractor_weights_path=str(self.weights), antialias=antialias)
        self.num_features = 2048 if output == "2048" else 1008 if output.startswith("logits") else int(output)
        self.name = f"inception-{output}{'-antialias' if antialias else ''}"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


class CLIPFeatures(nn.Module):
    """Normalised CLIP image embeddings of a reranker (:func:`t2i.pipeline.rerank.load_reranker`)."""

    def __init__(self, clip, name: str = "clip"):
        super().__init__()
        self.clip = clip
        with torch.no_grad():
            self.num_features = int(clip.image_features(torch.zeros(1, 3, 32, 32)).shape[-1])
        self.name = name

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images.float()
        return self.clip.image_features(x).double()


@lru_cache(maxsize=16)
def cached_sha256(path: str, mtime: float) -> str:
    """A weights file's SHA-256, hashed once per (path, modification time)."""
    return file_sha256(path)


def weights_hash(module: nn.Module) -> str:
    """SHA-256 over a module's parameters and buffers (names, shapes, values)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fingerprint(extractor: nn.Module, source: str | None = None) -> dict:
    """``{"name", "weights_sha256"}``: what a cache key and ``metrics.json`` record about an
    extractor. ``source`` is a weights file to hash instead of the module's tensors."""
    path = source or getattr(extractor, "weights", None)
    if path is not None and Path(str(path)).is_file():
        digest = cached_sha256(str(path), Path(str(path)).stat().st_mtime)
    else:
        digest = weights_hash(extractor)
    return {"name": getattr(extractor, "name", type(extractor).__name__), "weights_sha256": digest}
