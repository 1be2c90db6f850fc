"""The library's front door: every model this project trains or imports, loaded once and called.

* :class:`Pipeline` (:mod:`t2i.pipeline.text_to_image`): prompts -> images with a transformer checkpoint and
  what it carries, reranked by a CLIP or the caption likelihood, upscaled by Real-ESRGAN; also
  ``encode_text``, ``sample_codes``, ``decode``, ``tokenize``, ``score`` and ``caption`` on their own.
* :class:`Synthesizer` (:mod:`t2i.pipeline.spade`): label maps -> images with a SPADE checkpoint.
* :func:`load` (:mod:`t2i.pipeline.loading`): what a file is (:func:`identify`) and its model.
* :mod:`t2i.pipeline.rerank`, :mod:`t2i.pipeline.caption_rerank`, :mod:`t2i.pipeline.upscale`: the steps.

The commands (``t2i-generate``, ``t2i-caption``, ``t2i-synthesize``, ``t2i-eval``) are shells over these.
"""

from __future__ import annotations

import importlib

_EXPORTS = {"Pipeline": "text_to_image", "Generation": "text_to_image", "Synthesizer": "spade",
            "load": "loading", "identify": "loading", "Synthesis": "spade"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"t2i.pipeline.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 't2i.pipeline' has no attribute {name!r}")
