"""Pretrained CLIP rerankers from local files, behind the :mod:`t2i.pipeline.rerank` API (``score(images, texts)``).

- :class:`OpenCLIPReranker`: any open_clip architecture (``model_name``, e.g. ``ViT-B-32``,
  ``xlm-roberta-base-ViT-B-32`` for Chinese) with weights from a local ``.pt`` / ``.bin`` /
  ``.safetensors`` file.
- :class:`CNCLIPReranker`: Chinese-CLIP (the ``cn_clip`` package) from a local ``clip_cn_*.pt``;
  ``model_name`` is a published name (``ViT-B-16``, ``RN50``, ...), a ``vision@text`` pair of cn_clip
  configs, or a ``.json`` file with the full architecture (fine-tuned or custom sizes).

Nothing is downloaded: a missing file is one error naming it and where to fetch it on a connected
machine.

Images arrive as the pipeline's ``[N, 3, H, W]`` in [-1, 1] and get the backend's own preprocessing
on tensors, on the model's device: open_clip follows its eval ``image_transform`` for the model's
``preprocess_cfg`` (``resize_mode`` shortest: torchvision's ``Resize(size)`` + ``CenterCrop(size)``,
whose geometry :func:`open_clip_preprocess` reproduces; squash: a direct resize) and normalises with
its mean / std; cn_clip resizes straight to a square (its ``image_transform`` does not crop) and
normalises with the OpenAI CLIP mean / std.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from t2i.errors import ConfigError, T2IError

OPEN_CLIP_HINT = ("download it on a connected machine, e.g. `python -c \"import open_clip; "
                  "open_clip.create_model('{name}', pretrained='<tag>')\"` (then copy the file from the "
                  "Hugging Face cache) or from https://huggingface.co/laion, and pass its path")


OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    mean = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean) / std


def preprocess(images: torch.Tensor, size: int, mean, std, crop: bool = True) -> torch.Tensor:
    """[-1, 1] images -> the backend's input: shorter side to ``size`` (bicubic) and centre crop as
    open_clip does (:func:`open_clip_preprocess`), or (``crop=False``, cn_clip) a direct resize to
    ``size x size``; then normalise."""
    if crop:
        return open_clip_preprocess(images, size, mean, std)
    x = (images.float() + 1) / 2
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    return normalise(x, mean, std)


def open_clip_preprocess(images: torch.Tensor, size: int, mean, std, resize_mode: str = "shortest",
                         interpolation: str = "bicubic") -> torch.Tensor:
    """open_clip's eval transform on a batch of [-1, 1] float tensors. ``shortest`` is torchvision's
    ``Resize(size)`` then ``CenterCrop(size)`` on tensors: the shorter side becomes ``size``, the longer
    ``int(size * long / short)`` (truncated), nothing is resized when that is the input size already;
    the crop starts at ``int(round((side - size) / 2))`` (Python's round, halves to even).
    ``squash`` resizes straight to ``size x size``. Antialiased, not clamped (as torchvision on floats)."""
    if resize_mode not in ("shortest", "squash"):
        raise ConfigError(f"open_clip preprocess_cfg resize_mode={resize_mode!r} is not supported here; "
                          "t2i reproduces 'shortest' and 'squash'")
    mode = "bilinear" if interpolation == "bilinear" else "bicubic"
    x = (images.float() + 1) / 2
    h, w = x.shape[-2:]
    if resize_mode == "squash":
        target = (size, size)
    elif h <= w:
        target = (size, int(size * w / h))
    else:
        target = (int(size * h / w), size)
    if target != (h, w):
        x = F.interpolate(x, size=target, mode=mode, antialias=True, align_corners=False)
    h, w = x.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return normalise(x[..., top:top + size, left:left + size], mean, std)


class FeatureReranker(nn.Module):
    """What the file-backed backends share: ``self.model``'s device, and ``score`` as the dot product
    of their normalised ``image_features`` and ``text_features``."""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def score(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        return (self.image_features(images) * self.text_features(texts)).sum(-1)


class OpenCLIPReranker(FeatureReranker):
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
        self.resize_mode = cfg.get("resize_mode", "shortest")
        self.interpolation = cfg.get("interpolation", "bicubic")
        open_clip_preprocess(torch.zeros(1, 3, self.size, self.size), self.size, self.mean, self.std,
                             self.resize_mode, self.interpolation)  # an unsupported resize_mode fails here

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        x = open_clip_preprocess(images.to(self.device), self.size, self.mean, self.std, self.resize_mode,
                                 self.interpolation)
        return self.model.encode_image(x, normalize=True).float()

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(list(texts)).to(self.device), normalize=True).float()


CN_CLIP_HINT = ("download it on a connected machine, e.g. `python -c \"from cn_clip.clip import load_from_name; "
                "load_from_name('{name}', download_root='.')\"`, or from https://huggingface.co/OFA-Sys "
                "(chinese-clip-vit-base-patch16 holds clip_cn_vit-b-16.pt), and pass its path")


def cn_clip_config(model_name: str) -> tuple[dict, int]:
    """``(CLIP kwargs, input resolution)`` for a published name, a ``vision@text`` pair of cn_clip's
    configs, or a ``.json`` file holding the kwargs."""
    from cn_clip.clip import utils

    configs = Path(utils.__file__).parent / "model_configs"
    if str(model_name).endswith(".json"):
        path = Path(str(model_name)).expanduser()
        if not path.is_file():
            raise ConfigError(f"rerank.model_name={model_name}: no such architecture file")
        info = json.loads(path.read_text())
    else:
        struct = utils._MODEL_INFO.get(model_name, {}).get("struct", model_name)
        if "@" not in struct:
            raise ConfigError(f"rerank.model_name={model_name!r} is not a Chinese-CLIP model; use one of "
                              f"{sorted(utils._MODEL_INFO)}, a vision@text pair or a .json architecture")
        info = {}
        for part in struct.split("@"):
            f = configs / f"{part.replace('/', '-')}.json"
            if not f.is_file():
                known = sorted(p.stem for p in configs.glob("*.json"))
                raise ConfigError(f"rerank.model_name={model_name!r}: cn_clip has no config {part!r} ({known})")
            info.update(json.loads(f.read_text()))
    if isinstance(info.get("vision_layers"), str):
        info["vision_layers"] = ast.literal_eval(info["vision_layers"])
    return info, int(info["image_resolution"])


class CNCLIPReranker(FeatureReranker):
    def __init__(self, model_name: str, checkpoint: str):
        super().__init__()
        try:
            from cn_clip.clip import model as cn_model
            from cn_clip.clip import tokenize
        except ImportError:
            raise ConfigError("rerank.backend=cn_clip needs the Chinese-CLIP package: "
                              "pip install cn-clip (or the t2i[compat] extra)") from None
        info, self.size = cn_clip_config(model_name)
        path = Path(str(checkpoint)).expanduser() if checkpoint else None
        if path is None or not path.is_file():
            raise T2IError(f"rerank.ckpt={checkpoint}: no such file for Chinese-CLIP {model_name}; "
                           + CN_CLIP_HINT.format(name=model_name))
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise T2IError(f"rerank.ckpt={checkpoint} cannot be read ({type(e).__name__}: {e})") from None
        state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
        if not isinstance(state, dict):
            raise T2IError(f"rerank.ckpt={checkpoint} holds no Chinese-CLIP state_dict")
        state = {k.removeprefix("module."): v for k, v in state.items() if "bert.pooler" not in k}
        self.model = cn_model.CLIP(**info).float()
        try:
            self.model.load_state_dict(state)
        except RuntimeError as e:
            raise T2IError(f"rerank.ckpt={checkpoint} does not fit Chinese-CLIP {model_name} "
                           f"(wrong rerank.model_name?): {' '.join(str(e).split())[:300]}") from None
        self.model.eval()
        self.context_length = min(52, info.get("text_max_position_embeddings", 52))
        self.tokenize = tokenize

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        x = preprocess(images.to(self.device), self.size, OPENAI_MEAN, OPENAI_STD, crop=False)
        return F.normalize(self.model.encode_image(x).float(), dim=-1)

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenize(list(texts), context_length=self.context_length).to(self.device)
        return F.normalize(self.model.encode_text(ids).float(), dim=-1)
