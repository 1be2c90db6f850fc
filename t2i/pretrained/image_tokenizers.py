"""The one loader of image tokenizers, :func:`load_tokenizer`. It takes

* a path to our stage-1 Lightning checkpoint (``t2i-train experiment=*_vqgan`` / ``*_dvae``: its
  ``t2i_tokenizer`` entry names the class and its constructor arguments), or to a later stage's
  checkpoint that carries its tokenizer (``t2i_image_tokenizer``: class, arguments and weights -- what
  a transformer checkpoint holds);
* such a carried entry itself (:func:`t2i.models.records.tokenizer_record` writes one);
* a spec ``{"kind": "t2i" | "taming" | "openai_dvae", "files": {"ckpt": ..., "config": ...,
  "decoder": ...}}`` (:mod:`t2i.data.specs`): ``taming`` reads a CompVis VQModel / GumbelVQ ``.ckpt``
  and its YAML (``config``) through :func:`t2i.pretrained.load_taming_vqgan`, ``openai_dvae`` the
  ``dall_e`` ``encoder.pkl`` (``ckpt``) and ``decoder.pkl`` (``decoder``) through
  :func:`t2i.pretrained.load_openai_dvae`. A spec may record each file's sha256 (checked) and its path
  relative to a folder (tried when the absolute path is gone, e.g. after the folder moved).

Every tokenizer it returns keeps the image-tokenizer contract of :mod:`t2i.models`.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from t2i.data.specs import KINDS, SPEC_HINT, file_sha256, resolve_spec
from t2i.errors import T2IError
from t2i.keys import IMAGE_TOKENIZER_KEY, TOKENIZER_KEY
from t2i.models.records import from_parts
from t2i.pretrained.openai import load_openai_dvae
from t2i.pretrained.taming import find_taming_config, load_taming_vqgan


def tokenizer_spec(kind: str, ckpt, config=None, decoder=None, relative_to=None, names: dict | None = None) -> dict:
    """``{"kind", "files": {role: absolute path}, "sha256": {role: hex}[, "relative": {role: path}]}``
    for files that exist now (``relative``: each path relative to the folder ``relative_to``). A taming
    checkpoint without ``config`` gets the YAML beside it (:func:`t2i.pretrained.taming.find_taming_config`).
    ``names``: the setting of each role (``ckpt``, ``config``, ``decoder``), for error messages."""
    names = {"ckpt": "ckpt", "config": "config", "decoder": "decoder", **(names or {})}
    if kind not in KINDS:
        raise T2IError(f"tokenizer kind {kind!r} is unknown; use one of {', '.join(KINDS)}")
    if kind == "taming" and not config:
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


def _from_file(path: Path, key: str, map_location, hint: str | None = None) -> nn.Module:
    hint = hint or f"pass {key}={SPEC_HINT} (or kind openai_dvae with ckpt + decoder)"
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # not a torch file, truncated, or pickled objects (a public release: use a spec)
        why = ("it pickles Python objects, as public releases do" if isinstance(e, pickle.UnpicklingError)
               else f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        raise T2IError(f"{key}={path}: the tokenizer checkpoint cannot be read ({why}); for public weights {hint}") from None
    if isinstance(ckpt, dict) and isinstance(ckpt.get(IMAGE_TOKENIZER_KEY), dict):
        rec = ckpt[IMAGE_TOKENIZER_KEY]
        return from_parts(rec["target"], rec["config"], rec["state_dict"], str(path))
    entry = ckpt.get(TOKENIZER_KEY) if isinstance(ckpt, dict) else None
    if entry is None:
        raise T2IError(f"{key}={path} is not an image-tokenizer checkpoint (no '{TOKENIZER_KEY}' or '{IMAGE_TOKENIZER_KEY}' "
                       f"entry); for public weights {hint}")
    prefix = entry["prefix"]
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    return from_parts(entry["target"], entry["config"], state, str(path))


def load_tokenizer(source, map_location="cpu", key: str = "model.image_tokenizer", base=None,
                   check_hash: bool = True, hint: str | None = None) -> nn.Module:
    """The image tokenizer (``nn.Module`` in eval mode) named by ``source``: a checkpoint path, a carried
    record or a spec (see the module docstring). ``key``: the setting that names it, for error messages;
    ``base``: the folder a spec's ``relative`` paths are relative to; ``hint``: how to name public weights
    instead (default: a spec for ``key``). The result can be written into
    another checkpoint with :func:`tokenizer_record`."""
    if isinstance(source, Mapping):
        if "state_dict" in source and "target" in source:
            return from_parts(source["target"], source["config"], source["state_dict"], f"{key} (carried tokenizer)")
        spec = resolve_spec(source, base, key, check_hash=check_hash)
        files = spec["files"]
        if spec["kind"] == "t2i":
            return _from_file(Path(files["ckpt"]), key, map_location, hint)
        if spec["kind"] == "taming":
            model = load_taming_vqgan(files["ckpt"], files.get("config"), map_location=map_location)
        else:
            if not files.get("decoder"):
                raise T2IError(f"{key}: an openai_dvae tokenizer needs files.decoder (its decoder.pkl)")
            model = load_openai_dvae(files["ckpt"], files["decoder"], map_location=map_location)
        return model.eval()
    if not source:
        raise T2IError(f"{key} is not set: give a tokenizer .ckpt from `t2i-train experiment=*_vqgan` or *_dvae")
    p = Path(str(source)).expanduser()
    if not p.is_file():
        raise T2IError(f"tokenizer checkpoint {source}: no such file (set {key}= to a .ckpt from "
                       "`t2i-train experiment=*_vqgan` or *_dvae)")
    return _from_file(p, key, map_location, hint)
