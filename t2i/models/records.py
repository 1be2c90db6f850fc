"""A model written into a checkpoint and rebuilt from it: the class path, its constructor arguments and
its weights (``tokenizer_record`` / ``from_parts``), and the stage-1 entry (``tokenizer_entry``). Only
``nn.Module`` classes are built: a file must not choose what we call."""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from torch import nn

from t2i.errors import T2IError


def tokenizer_entry(target: str, config: dict, prefix: str = "model.") -> dict:
    """What a LightningModule stores in ``checkpoint[TOKENIZER_KEY]`` so the tokenizer can be rebuilt:
    the class path, its constructor arguments (plain types) and the prefix of its weights in ``state_dict``."""
    return {"target": target, "config": config, "prefix": prefix}


def build(target: str, config: dict) -> nn.Module:
    """``target(**config)`` for a ``torch.nn.Module`` class named by its import path (ours, taming's, or a
    researcher's own tokenizer class). A checkpoint names the class, so anything that is not an
    ``nn.Module`` class (a function such as ``os.system``) is refused: a file must not choose what we call."""
    module, _, name = str(target).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise T2IError(f"a checkpoint names {target!r}, which cannot be imported here (a class of another "
                       "t2i version, or a package that is not installed)") from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise T2IError(f"a checkpoint asks to build {target!r}, which is not an nn.Module class; refused")
    return cls(**config)


def plain(obj):
    """Mappings (incl. omegaconf's) and sequences as plain dicts / lists."""
    if isinstance(obj, Mapping):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) or type(obj).__name__ == "ListConfig":
        return [plain(v) for v in obj]
    return obj


def tokenizer_record(model: nn.Module) -> dict:
    """``{"target", "config", "state_dict"}``: everything needed to rebuild ``model`` (any tokenizer
    :func:`load_tokenizer` returned, or a VQGAN / DVAE with its ``config``); weights on the CPU."""
    spec = getattr(model, "build_spec", None)
    if spec is None:
        if not isinstance(getattr(model, "config", None), dict):
            raise T2IError(f"{type(model).__name__} cannot be saved with the checkpoint: it has no `config` of "
                           "constructor arguments (load it with t2i.pretrained.load_tokenizer)")
        spec = {"target": f"{type(model).__module__}.{type(model).__qualname__}", "config": model.config}
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {"target": spec["target"], "config": plain(spec["config"]), "state_dict": state}


def from_parts(target: str, config: dict, state: dict, where: str) -> nn.Module:
    model = build(target, dict(config))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise T2IError(f"{where}: weights do not match {target} "
                       f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    model.build_spec = {"target": target, "config": plain(config)}
    return model.eval()


