"""Plain ``nn.Module`` models (no Lightning, no Hydra): image tokenizers, transformer, CLIP.

Image tokenizer contract (VQGAN and dVAE): ``encode(images) -> LongTensor[B, h, w]`` for float
images ``[B, 3, H, W]`` in [-1, 1]; ``decode(codes) -> images`` in [-1, 1]; attributes
``codebook_size`` and ``downsample`` (H // h). :func:`load_tokenizer` rebuilds one from our
Lightning checkpoint without the training config.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from t2i.errors import T2IError

TOKENIZER_KEY = "t2i_tokenizer"  # checkpoint entry: {"target", "config", "prefix"}


def tokenizer_entry(target: str, config: dict, prefix: str = "model.") -> dict:
    """What a LightningModule stores in ``checkpoint[TOKENIZER_KEY]`` so the tokenizer can be rebuilt:
    the class path, its constructor arguments (plain types) and the prefix of its weights in ``state_dict``."""
    return {"target": target, "config": config, "prefix": prefix}


def build(target: str, config: dict) -> nn.Module:
    module, _, name = target.rpartition(".")
    return getattr(importlib.import_module(module), name)(**config)


def load_tokenizer(path, map_location="cpu") -> nn.Module:
    """The image tokenizer (``nn.Module`` in eval mode) saved in a t2i Lightning checkpoint."""
    p = Path(str(path))
    if not p.is_file():
        raise T2IError(f"tokenizer checkpoint {path}: no such file (set model.tokenizer_ckpt= to a .ckpt from "
                       "`t2i-train experiment=*_vqgan` or *_dvae)")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # not a torch file, or truncated
        raise T2IError(f"tokenizer checkpoint {path} cannot be read ({type(e).__name__}: {e})") from None
    entry = ckpt.get(TOKENIZER_KEY) if isinstance(ckpt, dict) else None
    if entry is None:
        raise T2IError(f"{path} is not an image-tokenizer checkpoint (no '{TOKENIZER_KEY}' entry); for public "
                       "weights use t2i.pretrained.load_taming_vqgan or load_openai_dvae")
    model = build(entry["target"], entry["config"])
    prefix = entry["prefix"]
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise T2IError(f"{path}: weights do not match {entry['target']} "
                       f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    return model.eval()
