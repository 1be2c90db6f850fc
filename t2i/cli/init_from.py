"""``t2i-train ... init_from=<ckpt>``: start training from another run's (or an imported model's) weights.

Unlike ``resume`` / ``ckpt_path`` (which continue a run: optimizer, step, data position), ``init_from``
takes only the weights; the optimizer, schedule and step start fresh. For a transformer checkpoint it
also takes what the weights are tied to:

- the architecture (``model.model.*``: sizes, layouts, attention patterns) -- the experiment's values
  are replaced and the replaced ones logged; ``dropout``, ``attn_dropout`` and ``attn_impl`` stay the
  experiment's (they do not change the weights);
- the text tokenizer the checkpoint carries, written to ``<run>/init_from_tokenizer.json`` and used as
  ``data.tokenizer``, and its ``text_len`` as ``data.text_len``;
- the image tokenizer it carries, unless ``model.image_tokenizer`` is set.

Code shards must come from the same image tokenizer (``t2i-tokenize tokenizer_ckpt=<the checkpoint>``):
a codebook or grid that differs is an error. Any other module (VQGAN, dVAE, CLIP) loads the weights
strictly into the model the config builds.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, open_dict

from t2i.errors import ConfigError, T2IError

log = logging.getLogger("t2i.train")
RUNTIME_KEYS = ("dropout", "attn_dropout", "attn_impl")  # training knobs: the experiment's, not the checkpoint's


def read(path) -> tuple[Path, dict]:
    p = Path(str(path)).expanduser().resolve()
    if not p.is_file():
        raise ConfigError(f"init_from={path}: no such file (a .ckpt from t2i-train or t2i-import)")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise T2IError(f"init_from={path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise T2IError(f"init_from={path}: not a t2i checkpoint (no state_dict)")
    return p, ckpt


def is_transformer(cfg: DictConfig) -> bool:
    return str(cfg.model.get("_target_", "")).endswith("TransformerModule")


def adopt(cfg: DictConfig, path: Path, ckpt: dict, out: Path) -> None:
    """Point the config at what a transformer checkpoint's weights are tied to (see the module docstring)."""
    from t2i.data.tokenizer import tokenizer_from_checkpoint

    arch = (ckpt.get("hyper_parameters") or {}).get("model")
    if not isinstance(arch, dict) or "image_vocab" not in arch:
        raise T2IError(f"init_from={path}: not a transformer checkpoint, but the experiment trains a transformer")
    tok = tokenizer_from_checkpoint(ckpt)
    if tok is None:
        raise T2IError(f"init_from={path} carries no text tokenizer (a checkpoint from an older t2i?)")
    changed = []
    with open_dict(cfg):
        for key, value in arch.items():
            if key in RUNTIME_KEYS:
                continue
            if cfg.model.model.get(key) not in (None, value):
                changed.append(f"{key}: {cfg.model.model.get(key)} -> {value}")
            cfg.model.model[key] = value
        tok_path = out / "init_from_tokenizer.json"
        if not tok_path.is_file() or tok_path.read_text(encoding="utf-8") != tok.to_str():
            out.mkdir(parents=True, exist_ok=True)
            tok.save(tok_path)
        cfg.data.tokenizer = str(tok_path)
        cfg.model.text_tokenizer = str(tok_path)
        cfg.data.text_len = int(arch["text_len"])
        if not cfg.model.get("image_tokenizer"):
            cfg.model.image_tokenizer = str(path)
    if changed:
        log.warning("init_from=%s: the model architecture is the checkpoint's: %s", path, "; ".join(changed))


def check_codes(cfg: DictConfig, arch: dict, path: Path) -> None:
    """Code shards made with another image tokenizer cannot train these weights."""
    codes = cfg.data.get("codes")
    if not codes:
        return
    from t2i.data.codes import read_manifest

    manifest = read_manifest(codes)
    vocab, grid = manifest.get("codebook_size"), manifest.get("grid")
    if vocab is not None and int(vocab) != int(arch["image_vocab"]) or grid is not None and \
            list(grid) != list(arch["image_grid"]):
        raise ConfigError(f"data.codes={codes} holds {vocab} codes on a {grid} grid; init_from={path} reads "
                          f"{arch['image_vocab']} codes on {arch['image_grid']}: tokenize the images with its image "
                          f"tokenizer (t2i-tokenize tokenizer_ckpt={path} ...) or train on images")


def load_weights(module, path: Path, ckpt: dict) -> None:
    """The checkpoint's weights into ``module`` (a transformer: its ``model``, and its EMA when it has one)."""
    from t2i.pretrained.export import check_state

    state = ckpt["state_dict"]
    if hasattr(module, "model") and hasattr(module, "ema") and any(k.startswith("model.") for k in state):
        own = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        check_state(module.model, own, f"init_from={path}")
        if module.ema is not None:
            module.ema.load_state_dict(module.model.state_dict())
    else:
        check_state(module, state, f"init_from={path}")
    log.info("init_from=%s: weights loaded (optimizer and step start fresh)", path)
