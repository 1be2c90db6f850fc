"""Real-ESRGAN / ESRGAN super-resolution weights -> :class:`t2i.models.rrdbnet.RRDBNet`.

* :func:`load_realesrgan`: a released ``.pth`` (``RealESRGAN_x4plus.pth``, ruDALL-E's ``x2/x4/x8`` files):
  weights under ``params_ema``, else ``params``, else a bare state dict. The geometry (num_in_ch,
  num_out_ch, num_feat, num_block, num_grow_ch, scale) is read from the tensor shapes (a whole pickled
  ``RRDBNet`` module is read too, without running its code); the load is strict
  and a mismatch is one :class:`T2IError` naming the file and the first mismatched keys.
* :func:`save_sr_checkpoint` / :func:`import_realesrgan`: our own weights-only form,
  ``{"t2i_sr": {"target": "t2i.models.rrdbnet.RRDBNet", "config": {...}, "state_dict": {...}}}``.
* :func:`load_sr`: either kind of file.

Files are read with :func:`t2i.pretrained._pickle.read_weights`: nothing named by the pickle is imported
or run unless ``trust_pickle=True``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from t2i.errors import ConfigError, T2IError
from t2i.keys import SR_KEY
from t2i.models.rrdbnet import SCALES, RRDBNet
from t2i.pretrained._pickle import module_state, read_weights, tensor_mapping

TARGET = "t2i.models.rrdbnet.RRDBNet"
WHAT = "Real-ESRGAN weights"


def _release_state(obj) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, Mapping):
        for key in ("params_ema", "params"):
            if key in obj:
                return tensor_mapping(obj[key])
    return tensor_mapping(obj)


def _extract(obj):
    """("t2i", record) for our own form, ("release", state dict) for a Real-ESRGAN file, else None."""
    if isinstance(obj, Mapping) and isinstance(obj.get(SR_KEY), Mapping):
        rec = obj[SR_KEY]
        if isinstance(rec.get("config"), Mapping) and tensor_mapping(rec.get("state_dict")) is not None:
            return "t2i", rec
        return None
    state = _release_state(obj) or module_state(obj)  # a state dict, or a whole pickled RRDBNet
    return None if state is None else ("release", state)


def infer_config(state: Mapping[str, torch.Tensor], scale: int | None = None) -> dict:
    """RRDBNet's constructor arguments from tensor shapes. Real-ESRGAN's x2 / x1 models read the
    pixel-unshuffled input (4x / 16x the image channels); the x8 model has ``conv_up3``. The input is
    taken to have as many channels as the output. Keys that are absent leave Real-ESRGAN's defaults
    (the strict load then names them). ``scale`` overrides the inferred scale (weights of another scale
    then fail the strict load on ``conv_first`` / ``conv_up3``)."""
    cfg = dict(num_in_ch=3, num_out_ch=3, scale=4, num_feat=64, num_block=23, num_grow_ch=32)
    first, last = state.get("conv_first.weight"), state.get("conv_last.weight")
    if last is not None and last.dim() == 4:
        cfg["num_out_ch"] = cfg["num_in_ch"] = int(last.shape[0])
    if first is not None and first.dim() == 4:
        cfg["num_feat"] = int(first.shape[0])
        ratio = int(first.shape[1]) // cfg["num_out_ch"]
        if int(first.shape[1]) % cfg["num_out_ch"] == 0 and ratio in (4, 16):
            cfg["scale"] = 2 if ratio == 4 else 1
        else:
            cfg["scale"] = 8 if "conv_up3.weight" in state else 4
        cfg["num_in_ch"] = int(first.shape[1]) // {1: 16, 2: 4}.get(cfg["scale"], 1)
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"body\.(\d+)\.", k))}
    if blocks:
        cfg["num_block"] = max(blocks) + 1
    grow = state.get("body.0.rdb1.conv1.weight")
    if grow is not None and grow.dim() == 4:
        cfg["num_grow_ch"] = int(grow.shape[0])
    if scale is not None:
        if int(scale) not in SCALES:
            raise ConfigError(f"scale={scale}: Real-ESRGAN's RRDBNet comes in scales {', '.join(map(str, SCALES))}")
        cfg["scale"] = int(scale)
    return cfg


def _strict_load(model: RRDBNet, state: Mapping[str, torch.Tensor], where: str) -> RRDBNet:
    """``model.load_state_dict(state, strict=True)`` with one error naming ``where`` and the first
    mismatched keys (missing, unexpected, wrong shape)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} (file {list(state[k].shape)}, model {list(own[k].shape)})" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
            if keys:
                parts.append(f"{len(keys)} {label}: {', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}")
        geometry = ", ".join(f"{k}={v}" for k, v in model.config.items())
        raise T2IError(f"{where}: the weights do not fit RRDBNet({geometry}): {'; '.join(parts)}. Pass a "
                       f"Real-ESRGAN RRDBNet file (RealESRGAN_x4plus.pth, ruDALL-E's x2/x4/x8) or a matching scale")
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_realesrgan(path, scale: int | None = None, trust_pickle: bool = False) -> RRDBNet:
    """A Real-ESRGAN ``.pth`` (or our own ``t2i_sr`` file) -> RRDBNet in eval mode, loaded strictly.
    ``scale``: the scale the weights must have (None: whatever the file holds)."""
    kind, found = read_weights(path, _extract, what=WHAT, trust_pickle=trust_pickle)
    if kind == "t2i":
        return _from_record(found, path, scale)
    cfg = infer_config(found, scale)
    return _strict_load(RRDBNet(**cfg), found, f"{WHAT} {path}")


def _from_record(rec: Mapping, path, scale: int | None) -> RRDBNet:
    if rec.get("target") != TARGET:
        raise T2IError(f"super-resolution checkpoint {path} names {rec.get('target')!r}; only {TARGET} is supported")
    cfg = dict(rec["config"])
    if scale is not None and int(scale) != int(cfg.get("scale", 4)):
        raise ConfigError(f"super-resolution checkpoint {path} is a x{cfg.get('scale')} model, not x{scale}")
    try:
        model = RRDBNet(**cfg)
    except (TypeError, ValueError) as e:
        raise T2IError(f"super-resolution checkpoint {path}: bad config {cfg} ({e})") from None
    return _strict_load(model, rec["state_dict"], f"super-resolution checkpoint {path}")


def load_sr(path, scale: int | None = None, trust_pickle: bool = False) -> RRDBNet:
    """Our ``t2i_sr`` file (:func:`save_sr_checkpoint`) or a Real-ESRGAN release -> RRDBNet (eval)."""
    return load_realesrgan(path, scale=scale, trust_pickle=trust_pickle)


def save_sr_checkpoint(model: RRDBNet, path) -> Path:
    """Write ``model`` as ``{"t2i_sr": {target, config, state_dict}}`` (readable with weights_only=True)."""
    from t2i.pretrained.export import save_atomic

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return save_atomic({SR_KEY: {"target": TARGET, "config": dict(model.config), "state_dict": state}}, path)


def import_realesrgan(input, output, scale: int | None = None, trust_pickle: bool = False) -> Path:
    """``t2i-import realesrgan``: a Real-ESRGAN ``.pth`` -> our weights-only SR file at ``output``."""
    return save_sr_checkpoint(load_realesrgan(input, scale=scale, trust_pickle=trust_pickle), output)
