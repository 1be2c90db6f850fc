"""Import CompVis taming-transformers VQGAN checkpoints into :class:`t2i.models.vqgan.VQGAN`.

A taming release is a Lightning checkpoint (``checkpoints/last.ckpt``: ``{"state_dict": ...}``)
plus the training YAML (``configs/model.yaml``)::

    model:
      target: taming.models.vqgan.VQModel        # or taming.models.vqgan.GumbelVQ
      params:
        embed_dim: 256
        n_embed: 16384
        ddconfig: {double_z: false, z_channels: 256, resolution: 256, in_channels: 3, out_ch: 3,
                   ch: 128, ch_mult: [1, 1, 2, 2, 4], num_res_blocks: 2, attn_resolutions: [16],
                   dropout: 0.0}
        lossconfig: {...}                         # ignored: only the autoencoder is imported

The YAML is read with omegaconf; taming itself is never imported. Our parameter names equal theirs,
so the generator weights (``encoder.``, ``decoder.``, ``quant_conv.``, ``post_quant_conv.``,
``quantize.``) load strictly; the loss (LPIPS, discriminator) entries are dropped.

``VQModel`` maps to ``quantizer={"kind": "vq", "legacy": True, "beta": 0.25}`` (taming's quantizer
weights the codebook/commitment terms the legacy way; this only matters for further training).
``GumbelVQ`` maps to ``{"kind": "gumbel", "kl_weight": <its kl_weight>}``; note that taming's
``GumbelQuantize`` *samples* (Gumbel noise, hard one-hot) even in eval mode, while our ``encode`` takes
the argmax of the same logits -- the deterministic tokenization. Codebooks with ``remap`` (a ``.npy``
of used indices) are not supported.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from t2i.errors import T2IError
from t2i.models.vqgan import VQGAN
from t2i.pretrained._pickle import read_weights, tensor_mapping

VQ_TARGETS = {"taming.models.vqgan.VQModel", "taming.models.vqgan.VQNoDiscModel"}
GUMBEL_TARGETS = {"taming.models.vqgan.GumbelVQ"}
GENERATOR_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "quantize.")
IGNORED_PREFIXES = ("loss.",)
# ddconfig keys we read, and those that must keep taming's default for the architecture to match ours
DDCONFIG_KEYS = {"ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "resolution", "dropout"}
DDCONFIG_FIXED = {"double_z": False, "in_channels": 3, "out_ch": 3, "resamp_with_conv": True,
                  "give_pre_end": False}


def _model_node(cfg, source: str) -> DictConfig:
    node = cfg.get("model", cfg) if isinstance(cfg, DictConfig) else None
    if not isinstance(node, DictConfig) or "target" not in node:
        raise T2IError(f"{source}: not a taming model config (no model.target)")
    return node


def taming_vqgan_config(config) -> dict:
    """Constructor arguments of :class:`VQGAN` for a taming YAML (path, dict or DictConfig).

    Raises :class:`T2IError` for targets other than ``VQModel``/``GumbelVQ``, for ``remap``, and for
    ``ddconfig`` values our architecture does not have.
    """
    source = str(config) if isinstance(config, (str, Path)) else "taming config"
    if isinstance(config, (str, Path)):
        try:
            config = OmegaConf.load(str(config))
        except Exception as e:
            raise T2IError(f"{source}: cannot read the YAML ({type(e).__name__}: {e})") from None
    elif isinstance(config, dict):
        config = OmegaConf.create(config)
    node = _model_node(config, source)
    target = str(node.target)
    params = node.get("params") or {}
    if target not in VQ_TARGETS | GUMBEL_TARGETS:
        raise T2IError(f"{source}: model target {target} is not supported; t2i imports "
                       f"{sorted(VQ_TARGETS | GUMBEL_TARGETS)}")
    if params.get("remap") is not None:
        raise T2IError(f"{source}: this model remaps its codebook (remap={params.remap}); remapped codebooks "
                       "(a .npy of used code indices) are not supported by t2i.pretrained.load_taming_vqgan")
    missing = [k for k in ("ddconfig", "n_embed", "embed_dim") if k not in params]
    if missing:
        raise T2IError(f"{source}: model.params lacks {missing}")
    dd = OmegaConf.to_container(params.ddconfig, resolve=True)
    absent = sorted(DDCONFIG_KEYS - {"dropout"} - set(dd))
    unknown = sorted(set(dd) - DDCONFIG_KEYS - set(DDCONFIG_FIXED))
    if absent or unknown:
        raise T2IError(f"{source}: ddconfig {'lacks ' + str(absent) if absent else ''}"
                       f"{' and ' if absent and unknown else ''}{'has unknown keys ' + str(unknown) if unknown else ''}")
    for key, value in DDCONFIG_FIXED.items():
        if key in dd and dd[key] != value:
            raise T2IError(f"{source}: ddconfig.{key}={dd[key]} is not supported (t2i's VQGAN has {key}={value})")
    kwargs = {k: dd[k] for k in DDCONFIG_KEYS if k in dd}
    kwargs["ch_mult"], kwargs["attn_resolutions"] = list(dd["ch_mult"]), list(dd["attn_resolutions"])
    kwargs.update(n_embed=int(params.n_embed), embed_dim=int(params.embed_dim))
    if target in GUMBEL_TARGETS:
        if kwargs["embed_dim"] != kwargs["z_channels"]:
            raise T2IError(f"{source}: GumbelVQ with embed_dim={kwargs['embed_dim']} != z_channels="
                           f"{kwargs['z_channels']} cannot run in taming either (its proj reads z_channels)")
        kwargs["quantizer"] = {"kind": "gumbel", "kl_weight": float(params.get("kl_weight", 1e-8)),
                               "straight_through": True, "temperature": 1.0}
    else:
        kwargs["quantizer"] = {"kind": "vq", "beta": 0.25, "legacy": True}
    return kwargs


def _has_model_target(path: Path) -> bool:
    try:
        cfg = OmegaConf.load(str(path))
        _model_node(cfg, str(path))
        return True
    except Exception:
        return False


def find_taming_config(ckpt_path) -> Path:
    """The YAML of a taming checkpoint: ``*.yaml`` next to it, else in ``../configs/`` (taming's release
    and log layout). Among several files, the one with a ``model.target``; a clear error otherwise."""
    ckpt = Path(str(ckpt_path)).expanduser().resolve()
    places = [ckpt.parent, ckpt.parent.parent / "configs"]
    for place in places:
        candidates = sorted(place.glob("*.yaml")) + sorted(place.glob("*.yml"))
        models = [c for c in candidates if _has_model_target(c)]
        if len(models) == 1:
            return models[0]
        if len(models) > 1:
            raise T2IError(f"taming checkpoint {ckpt_path}: several model configs in {place} "
                           f"({[m.name for m in models]}); give the one to use (t2i-import taming: config=; a tokenizer spec: "
                           f"files.config)")
    raise T2IError(f"taming checkpoint {ckpt_path}: no model config (*.yaml with model.target) found in "
                   f"{places[0]} or {places[1]}; give taming's configs/model.yaml (t2i-import taming: config=; a "
                   f"tokenizer spec: files.config)")


def _taming_state(obj) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, dict) and "state_dict" in obj:
        return tensor_mapping(obj["state_dict"])
    return tensor_mapping(obj)


def load_taming_vqgan(ckpt_path, config_path=None, *, trust_pickle: bool = False, map_location="cpu") -> VQGAN:
    """A taming-transformers ``VQModel``/``GumbelVQ`` checkpoint as our :class:`VQGAN` (eval mode).

    ``config_path``: the run's YAML; by default a ``*.yaml`` next to the checkpoint or in ``../configs/``.

    Reading the ``.ckpt``: ``torch.load(weights_only=True)`` first. Taming's checkpoints were written by
    Lightning 1.x and usually also pickle Python objects (e.g. the ``ModelCheckpoint`` class as the key
    of ``callbacks``), which weights-only loading refuses; we then read the file with an unpickler that
    rebuilds tensors but replaces every other object by an inert placeholder (no code from the file
    runs), which is enough for ``state_dict``. Only if that fails too, and only with
    ``trust_pickle=True``, is the file fully unpickled -- which can execute arbitrary code, so pass it
    only for checkpoints from a source you trust.
    """
    config_path = Path(str(config_path)).expanduser() if config_path is not None else find_taming_config(ckpt_path)
    if not config_path.is_file():
        raise T2IError(f"taming config {config_path}: no such file")
    kwargs = taming_vqgan_config(config_path)
    state = read_weights(ckpt_path, _taming_state, what="taming checkpoint", trust_pickle=trust_pickle,
                         map_location=map_location)
    gen = {k: v for k, v in state.items() if k.startswith(GENERATOR_PREFIXES)}
    other = sorted(k for k in state if not k.startswith(GENERATOR_PREFIXES + IGNORED_PREFIXES) and k != "colorize")
    if "quantize.used" in gen:
        raise T2IError(f"taming checkpoint {ckpt_path} has a remapped codebook (quantize.used); remapped "
                       "codebooks are not supported")
    if other:
        raise T2IError(f"taming checkpoint {ckpt_path}: unexpected entries {other[:5]} (not a VQModel/GumbelVQ?)")
    model = VQGAN(**kwargs)
    try:
        missing, unexpected = model.load_state_dict(gen, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise T2IError(f"taming checkpoint {ckpt_path} does not match its config {config_path}: {e}") from None
    if missing or unexpected:
        raise T2IError(f"taming checkpoint {ckpt_path} does not match its config {config_path} "
                       f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    return model.eval()
