"""Write an imported model as an ordinary t2i transformer checkpoint.

The file has what a ``t2i-train experiment=*_transformer`` checkpoint has and every entry point reads:
``hyper_parameters`` (the :class:`~t2i.lit.transformer.TransformerModule` arguments, model sizes filled
in), ``state_dict`` (``model.*``), the image tokenizer under ``t2i_image_tokenizer`` and the text
tokenizer (a ``tokenizers`` JSON) under ``t2i_text_tokenizer``. ``t2i_import`` records where it came
from: the source kind, each input file with its sha256, and the t2i version. It is read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn

from t2i.data.specs import file_sha256
from t2i.data.tokenizer import TextTokenizer
from t2i.errors import T2IError
from t2i.keys import IMAGE_TOKENIZER_KEY, IMPORT_KEY, LEXICON_KEY, TEXT_TOKENIZER_KEY
from t2i.models.records import tokenizer_record
from t2i.models.transformer import Transformer


def check_state(model: nn.Module, state: dict, where: str) -> None:
    """Strict load with one error naming ``where`` and the first missing / unexpected / misshapen keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"missing {missing[:5]}" if missing else "", f"unexpected {unexpected[:5]}" if unexpected else "",
                 f"wrong shape {shapes[:3]}" if shapes else ""]
        raise T2IError(f"{where}: the weights do not fit the model ({'; '.join(p for p in parts if p)})")
    model.load_state_dict(state, strict=True)


def provenance(source: str, files: dict) -> dict:
    """``{"source", "files": {role: {"path", "sha256"}}, "t2i_version"}`` for the files that exist."""
    from t2i import __version__

    out = {}
    for role, path in files.items():
        if path is not None and Path(str(path)).is_file():
            out[role] = {"path": str(Path(str(path)).resolve()), "sha256": file_sha256(path)}
    return {"source": source, "files": out, "t2i_version": __version__}


def transformer_checkpoint(model_config: dict, state: dict, text_tokenizer: TextTokenizer,
                           image_tokenizer: nn.Module, where: str, meta: dict | None = None,
                           loss_weights: tuple[float, float] = (1.0, 7.0)) -> dict:
    """The checkpoint dict (see the module docstring). ``state``: the :class:`Transformer`'s own weights
    (no ``model.`` prefix), loaded strictly into a model built from ``model_config`` first."""
    model = Transformer(**model_config)
    check_state(model, state, where)
    if image_tokenizer.codebook_size != model.image_vocab:
        raise T2IError(f"{where}: the image tokenizer has {image_tokenizer.codebook_size} codes, the transformer "
                       f"{model.image_vocab}")
    if text_tokenizer.vocab_size > model.text_vocab:
        raise T2IError(f"{where}: the text tokenizer has {text_tokenizer.vocab_size} ids, the transformer reads "
                       f"{model.text_vocab}: pass the vocabulary the model was trained with")
    hparams = {"model": dict(model_config), "codes": None, "text_tokenizer": None, "image_tokenizer": None,
               "text_loss_weight": float(loss_weights[0]), "image_loss_weight": float(loss_weights[1]),
               "cond_drop_prob": 0.0, "warmup_steps": 0, "schedule": "cosine", "ema_decay": None}
    meta = dict(meta or {})
    lexicon = meta.pop("lexicon", None)
    extra = {}
    if model_config.get("knowledge"):
        if lexicon is None:
            raise T2IError(f"{where}: a model with knowledge needs its entity lexicon")

        k = model_config["knowledge"]
        hparams["knowledge"] = {"enabled": True, "lexicon": None, "vectors": None, "trainable": k["trainable"],
                                "fusion": k["fusion"], "max_entities": 10}
        extra[LEXICON_KEY] = lexicon.to_str()
    return {**extra,
        "pytorch-lightning_version": pl.__version__,
        "epoch": 0,
        "global_step": 0,
        "hyper_parameters": hparams,
        "state_dict": {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        IMAGE_TOKENIZER_KEY: tokenizer_record(image_tokenizer),
        TEXT_TOKENIZER_KEY: {"tokenizer": text_tokenizer.to_str(), "tokenizer_fingerprint": text_tokenizer.fingerprint},
        IMPORT_KEY: meta,
    }


def save_atomic(obj: dict, output) -> Path:
    """``torch.save`` to a temporary file in the output's folder, then rename: no half-written file."""
    out = Path(str(output)).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
