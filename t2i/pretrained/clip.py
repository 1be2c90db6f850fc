"""Pretrained CLIP rerankers from local files, behind the :mod:`t2i.rerank` API (``score(images, texts)``).

- :class:`OpenCLIPReranker`: any open_clip architecture (``model_name``, e.g. ``ViT-B-32``,
  ``xlm-roberta-base-ViT-B-32`` for Chinese) with weights from a local ``.pt`` / ``.bin`` /
  ``.safetensors`` file. Nothing is downloaded: a missing file is one error naming it and where to
  fetch it on a connected machine.

Images arrive as the pipeline's ``[N, 3, H, W]`` in [-1, 1] and get the backend's own preprocessing
on tensors: resize of the shorter side to the model's input size (bicubic, antialiased), centre crop,
then its mean / std normalisation (open_clip's ``preprocess_cfg``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from t2i.errors import ConfigError, T2IError

OPEN_CLIP_HINT = ("download it on a connected machine, e.g. `python -c \"import open_clip; "
                  "open_clip.create_model('{name}', pretrained='<tag>')\"` (then copy the file from the "
                  "Hugging Face cache) or from https://huggingface.co/laion, and pass its path")


def preprocess(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """[-1, 1] images -> the backend's input: shorter side to ``size`` (bicubic), centre crop, normalise."""
    x = (images.float() + 1) / 2
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[..., top:top + size, left:left + size]
    mean = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


class OpenCLIPReranker(nn.Module):
    def __init__(self, model_name: str, checkpoint: str):
        super().__init__()
        try:
            import open_clip
        except ImportError:
            raise ConfigError("rerank.backend=open_clip needs the open_clip package: "
                              "pip install open-clip-torch (or the t2i[compat] extra)") from None
        if model_name not in open_clip.list_models():
            raise ConfigError(f"rerank.model_name={model_name!r} is not an open_clip architecture "
                              f"(open_clip.list_models() lists {len(open_clip.list_models())})")
        path = Path(str(checkpoint)).expanduser() if checkpoint else None
        if path is None or not path.is_file():
            raise T2IError(f"rerank.ckpt={checkpoint}: no such file for open_clip {model_name}; "
                           + OPEN_CLIP_HINT.format(name=model_name))
        self.model = open_clip.create_model(model_name, pretrained=str(path), pretrained_text=False).eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        cfg = self.model.visual.preprocess_cfg
        size = cfg.get("size", self.model.visual.image_size)
        self.size = size[0] if isinstance(size, (tuple, list)) else int(size)
        self.mean, self.std = tuple(cfg["mean"]), tuple(cfg["std"])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def score(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        x = preprocess(images.to(self.device), self.size, self.mean, self.std)
        image = self.model.encode_image(x, normalize=True)
        text = self.model.encode_text(self.tokenizer(list(texts)).to(self.device), normalize=True)
        return (image * text).sum(-1)
