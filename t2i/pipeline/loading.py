"""``t2i.load(path)``: what a file is, and its model, with the errors the commands give.

==================  ==================================================  =====================================
kind                the file                                            ``load`` returns
==================  ==================================================  =====================================
``tokenizer``       a stage-1 checkpoint (``*_vqgan`` / ``*_dvae``) or  the image tokenizer (``nn.Module``)
                    a ``t2i-import taming`` / ``openai_dvae`` file
``transformer``     a ``*_transformer`` checkpoint or a ``t2i-import``  a :class:`~t2i.pipeline.Pipeline`
                    EasyNLP / ARTIST / ruDALL-E file
``clip``            a ``*_clip`` checkpoint                             a reranker (``score(images, texts)``)
``spade``           a ``*_spade`` checkpoint                            a :class:`~t2i.pipeline.Synthesizer`
``sr``              a ``t2i-import realesrgan`` file or a Real-ESRGAN   the RRDBNet
                    ``.pth``
==================  ==================================================  =====================================

Every file is read with ``weights_only=True``; a public release that pickles Python objects is named
with the ``t2i-import`` command that converts it.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from t2i.errors import T2IError
from t2i.keys import IMAGE_TOKENIZER_KEY, IMPORT_KEY, SR_KEY, TOKENIZER_KEY

KINDS = ("tokenizer", "transformer", "clip", "spade", "sr")
IMPORT_HINT = ("a public release is converted first: t2i-import source=<taming | openai_dvae | easynlp | rudalle | "
               "realesrgan> input=<its files> output=<file>")


def _read(path) -> dict:
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise T2IError(f"{path}: no such file")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        why = ("it pickles Python objects" if isinstance(e, pickle.UnpicklingError)
               else f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        raise T2IError(f"{path} cannot be read as weights ({why}); {IMPORT_HINT}") from None
    if not isinstance(obj, dict):
        raise T2IError(f"{path} holds a {type(obj).__name__}, not a checkpoint; {IMPORT_HINT}")
    return obj


def kind_of(ckpt: dict) -> str | None:
    """The kind of an already read checkpoint dict (None when it is none of :data:`KINDS`)."""
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt.get("hyper_parameters"), dict) else {}
    model = hp.get("model") if isinstance(hp.get("model"), dict) else {}
    if SR_KEY in ckpt:
        return "sr"
    if "state_dict" in ckpt and "image_vocab" in model:
        return "transformer"
    if TOKENIZER_KEY in ckpt or (IMAGE_TOKENIZER_KEY in ckpt and "state_dict" not in ckpt):
        return "tokenizer"
    if "state_dict" in ckpt and "num_classes" in model:
        return "spade"
    state = ckpt.get("state_dict") if isinstance(ckpt.get("state_dict"), dict) else {}
    if "clip" in str(hp.get("_target_", "")).lower() or any(k.endswith("logit_scale") for k in state):
        return "clip"
    if "params_ema" in ckpt or "params" in ckpt or any(str(k).startswith("conv_first.") for k in ckpt):
        return "sr"  # a Real-ESRGAN release (.pth of RRDBNet weights)
    return None


def identify(path) -> str:
    """One of :data:`KINDS` for the file at ``path``; a T2IError saying what to do for anything else."""
    kind = kind_of(_read(path))
    if kind is None:
        raise T2IError(f"{path} is not a t2i checkpoint (no stage-1 tokenizer, transformer, CLIP, SPADE or SR "
                       f"entries); {IMPORT_HINT}")
    return kind


def imported_from(path) -> dict | None:
    """What ``t2i-import`` recorded of a converted file (source, files, sha256), or None for our own runs."""
    return _read(path).get(IMPORT_KEY)


def load(path, device="auto", **kwargs):
    """The model of the file at ``path`` (see the module docstring); ``kwargs`` go to
    :meth:`Pipeline.from_checkpoint <t2i.pipeline.Pipeline.from_checkpoint>` for a transformer."""
    from t2i.devices import pick_device

    kind = identify(path)
    if kind == "transformer":
        from t2i.pipeline.text_to_image import Pipeline

        return Pipeline.from_checkpoint(path, device=device, **kwargs)
    if kwargs:
        raise T2IError(f"{path} is a {kind} checkpoint; {sorted(kwargs)} apply to transformer checkpoints only")
    dev = pick_device(device)
    if kind == "tokenizer":
        from t2i.pretrained.image_tokenizers import load_tokenizer

        return load_tokenizer(path, key="path").to(dev)
    if kind == "clip":
        from t2i.pipeline.rerank import load_reranker

        return load_reranker(path).to(dev)
    if kind == "spade":
        from t2i.pipeline.spade import Synthesizer

        return Synthesizer.from_checkpoint(path, device=dev)
    from t2i.pretrained.realesrgan import load_sr

    return load_sr(Path(str(path)).expanduser()).to(dev).eval()
