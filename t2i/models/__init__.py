"""Plain ``nn.Module`` models (no Lightning, no Hydra): image tokenizers, transformer, CLIP.

Image tokenizer contract (VQGAN and dVAE): ``encode(images) -> LongTensor[B, h, w]`` for float
images ``[B, 3, H, W]`` in [-1, 1]; ``decode(codes) -> images`` in [-1, 1]; attributes
``codebook_size`` and ``downsample`` (H // h).

:func:`load_tokenizer` is the one loader of image tokenizers. It takes

* a path to our stage-1 Lightning checkpoint (``t2i-train experiment=*_vqgan`` / ``*_dvae``: its
  ``t2i_tokenizer`` entry names the class and its constructor arguments), or to a later stage's
  checkpoint that carries its tokenizer (``t2i_image_tokenizer``: class, arguments and weights -- what
  a transformer checkpoint holds);
* such a carried entry itself (:func:`tokenizer_record` writes one);
* a spec ``{"kind": "t2i" | "taming" | "openai_dvae", "files": {"ckpt": ..., "config": ...,
  "decoder": ...}}`` (:func:`tokenizer_spec`): ``taming`` reads a CompVis VQModel / GumbelVQ ``.ckpt``
  and its YAML (``config``) through :func:`t2i.pretrained.load_taming_vqgan`, ``openai_dvae`` the
  ``dall_e`` ``encoder.pkl`` (``ckpt``) and ``decoder.pkl`` (``decoder``) through
  :func:`t2i.pretrained.load_openai_dvae`. A spec may record each file's sha256 (checked) and its path
  relative to a folder (tried when the absolute path is gone, e.g. after the folder moved).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from t2i.errors import T2IError

TOKENIZER_KEY = "t2i_tokenizer"  # stage-1 checkpoint entry: {"target", "config", "prefix"}
IMAGE_TOKENIZER_KEY = "t2i_image_tokenizer"  # later-stage checkpoint entry: {"target", "config", "state_dict", ...}
KINDS = {"t2i": ("ckpt",), "taming": ("ckpt", "config"), "openai_dvae": ("ckpt", "decoder")}  # kind: file roles
SPEC_HINT = "'{kind: taming, files: {ckpt: <vqgan .ckpt>, config: <its model.yaml>}}'"


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


def file_sha256(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _plain(obj):
    """Mappings (incl. omegaconf's) and sequences as plain dicts / lists."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) or type(obj).__name__ == "ListConfig":
        return [_plain(v) for v in obj]
    return obj


# -- specs: which files make a tokenizer --------------------------------------------------------
def tokenizer_spec(kind: str, ckpt, config=None, decoder=None, relative_to=None, names: dict | None = None) -> dict:
    """``{"kind", "files": {role: absolute path}, "sha256": {role: hex}[, "relative": {role: path}]}``
    for files that exist now (``relative``: each path relative to the folder ``relative_to``). A taming
    checkpoint without ``config`` gets the YAML beside it (:func:`t2i.pretrained.find_taming_config`).
    ``names``: the setting of each role (``ckpt``, ``config``, ``decoder``), for error messages."""
    names = {"ckpt": "ckpt", "config": "config", "decoder": "decoder", **(names or {})}
    if kind not in KINDS:
        raise T2IError(f"tokenizer kind {kind!r} is unknown; use one of {', '.join(KINDS)}")
    if kind == "taming" and not config:
        from t2i.pretrained import find_taming_config

        config = find_taming_config(ckpt)
    if kind == "openai_dvae" and not decoder:
        raise T2IError(f"an openai_dvae tokenizer needs its decoder.pkl too: set {names['decoder']}=")
    given = {"ckpt": ckpt, "config": config, "decoder": decoder}
    files = {}
    for role in KINDS[kind]:
        p = Path(str(given[role])).expanduser()
        if not p.is_file():
            raise T2IError(f"{names[role]}={given[role]}: no such file")
        files[role] = str(p.resolve())
    spec = {"kind": kind, "files": files, "sha256": {r: file_sha256(p) for r, p in files.items()}}
    if relative_to is not None:
        base = Path(str(relative_to)).expanduser().resolve()
        spec["relative"] = {r: os.path.relpath(p, base) for r, p in files.items()}
    return spec


def resolve_spec(spec: Mapping, base=None, key: str = "model.image_tokenizer", check_hash: bool = True) -> dict:
    """The spec with ``files`` pointing at files that exist here: each recorded path, else its ``relative``
    path under ``base``; every file with a recorded sha256 is checked against it. One clear error naming
    ``key`` (the override that fixes it) otherwise."""
    spec = _plain(spec)
    kind = spec.get("kind", "t2i")
    if kind not in KINDS:
        raise T2IError(f"{key}: tokenizer kind {kind!r} is unknown; use one of {', '.join(KINDS)}")
    files = dict(spec.get("files") or {})
    if "ckpt" not in files:
        raise T2IError(f"{key}: the tokenizer spec names no ckpt file; give {key}=<tokenizer .ckpt> or {SPEC_HINT}")
    relative, hashes, found = spec.get("relative") or {}, spec.get("sha256") or {}, {}
    for role, path in files.items():
        if path is None:
            continue
        tried = [Path(str(path)).expanduser()]
        if base is not None and relative.get(role):
            tried.append(Path(str(base)).expanduser() / relative[role])
        hit = next((p for p in tried if p.is_file()), None)
        if hit is None:
            where = " or ".join(str(p) for p in tried)
            raise T2IError(f"image tokenizer {role} file {where}: no such file (was it moved?); pass "
                           f"{key}=<its path> (a t2i tokenizer .ckpt or a transformer .ckpt that carries one, or "
                           f"for public weights {key}={SPEC_HINT})")
        if check_hash and hashes.get(role):
            got = file_sha256(hit)
            if got != hashes[role]:
                raise T2IError(f"image tokenizer {role} file {hit} has sha256 {got[:12]}, not the {hashes[role][:12]} "
                               f"recorded when its codes were made (the file changed since t2i-tokenize); pass "
                               f"{key}=<the original file> or re-run t2i-tokenize")
        found[role] = str(hit.resolve())
    return {**spec, "kind": kind, "files": found}


# -- records: a tokenizer carried inside another checkpoint -----------------------------------------
def tokenizer_record(model: nn.Module) -> dict:
    """``{"target", "config", "state_dict"}``: everything needed to rebuild ``model`` (any tokenizer
    :func:`load_tokenizer` returned, or a VQGAN / DVAE with its ``config``); weights on the CPU."""
    spec = getattr(model, "build_spec", None)
    if spec is None:
        if not isinstance(getattr(model, "config", None), dict):
            raise T2IError(f"{type(model).__name__} cannot be saved with the checkpoint: it has no `config` of "
                           "constructor arguments (load it with t2i.models.load_tokenizer)")
        spec = {"target": f"{type(model).__module__}.{type(model).__qualname__}", "config": model.config}
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {"target": spec["target"], "config": _plain(spec["config"]), "state_dict": state}


def _from_parts(target: str, config: dict, state: dict, where: str) -> nn.Module:
    model = build(target, dict(config))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise T2IError(f"{where}: weights do not match {target} "
                       f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    model.build_spec = {"target": target, "config": _plain(config)}
    return model.eval()


def _from_file(path: Path, key: str, map_location, hint: str | None = None) -> nn.Module:
    hint = hint or f"pass {key}={SPEC_HINT} (or kind openai_dvae with ckpt + decoder)"
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # not a torch file, truncated, or pickled objects (a public release: use a spec)
        why = ("it pickles Python objects, as public releases do" if isinstance(e, pickle.UnpicklingError)
               else f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        raise T2IError(f"tokenizer checkpoint {path} cannot be read ({why}); for public weights {hint}") from None
    if isinstance(ckpt, dict) and isinstance(ckpt.get(IMAGE_TOKENIZER_KEY), dict):
        rec = ckpt[IMAGE_TOKENIZER_KEY]
        return _from_parts(rec["target"], rec["config"], rec["state_dict"], str(path))
    entry = ckpt.get(TOKENIZER_KEY) if isinstance(ckpt, dict) else None
    if entry is None:
        raise T2IError(f"{path} is not an image-tokenizer checkpoint (no '{TOKENIZER_KEY}' or '{IMAGE_TOKENIZER_KEY}' "
                       f"entry); for public weights {hint}")
    prefix = entry["prefix"]
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    return _from_parts(entry["target"], entry["config"], state, str(path))


def load_tokenizer(source, map_location="cpu", key: str = "model.image_tokenizer", base=None,
                   check_hash: bool = True, hint: str | None = None) -> nn.Module:
    """The image tokenizer (``nn.Module`` in eval mode) named by ``source``: a checkpoint path, a carried
    record or a spec (see the module docstring). ``key``: the setting that names it, for error messages;
    ``base``: the folder a spec's ``relative`` paths are relative to; ``hint``: how to name public weights
    instead (default: a spec for ``key``). The result can be written into
    another checkpoint with :func:`tokenizer_record`."""
    if isinstance(source, Mapping):
        if "state_dict" in source and "target" in source:
            return _from_parts(source["target"], source["config"], source["state_dict"], f"{key} (carried tokenizer)")
        spec = resolve_spec(source, base, key, check_hash=check_hash)
        files = spec["files"]
        if spec["kind"] == "t2i":
            return _from_file(Path(files["ckpt"]), key, map_location, hint)
        from t2i import pretrained

        if spec["kind"] == "taming":
            model = pretrained.load_taming_vqgan(files["ckpt"], files.get("config"), map_location=map_location)
        else:
            if not files.get("decoder"):
                raise T2IError(f"{key}: an openai_dvae tokenizer needs files.decoder (its decoder.pkl)")
            model = pretrained.load_openai_dvae(files["ckpt"], files["decoder"], map_location=map_location)
        return model.eval()
    if not source:
        raise T2IError(f"{key} is not set: give a tokenizer .ckpt from `t2i-train experiment=*_vqgan` or *_dvae")
    p = Path(str(source)).expanduser()
    if not p.is_file():
        raise T2IError(f"tokenizer checkpoint {source}: no such file (set {key}= to a .ckpt from "
                       "`t2i-train experiment=*_vqgan` or *_dvae)")
    return _from_file(p, key, map_location, hint)
