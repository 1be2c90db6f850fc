"""Reference implementations from peer packages, importable despite their stale imports (tests only).

- ``mingpt_gpt()``: taming-transformers' minGPT ``GPT`` (EasyNLP's ARTIST transformer is a copy of it).
  Its module imports ``transformers.top_k_top_p_filtering``, which transformers 5 removed; it is only used
  by taming's sampling helpers, so a stand-in that refuses to run is put there first.
- ``rudalle_module(name)``: a submodule of the ``rudalle`` package (e.g. ``rudalle.dalle.model``) without
  running the package's ``__init__`` files, which import ``huggingface_hub.cached_download`` (gone from
  huggingface_hub) to download weights. Stub packages with the real ``__path__`` are registered instead.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest


def mingpt_gpt():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("taming")
    if not hasattr(transformers, "top_k_top_p_filtering"):
        def top_k_top_p_filtering(*args, **kwargs):
            raise NotImplementedError("stand-in: removed from transformers, unused by these tests")

        transformers.top_k_top_p_filtering = top_k_top_p_filtering
    return importlib.import_module("taming.modules.transformer.mingpt").GPT


def rudalle_module(name: str) -> types.ModuleType:
    root = sys.modules.get("rudalle")
    if root is not None and getattr(root, "__t2i_stub__", False):
        base = root.__path__[0]
    else:
        spec = importlib.util.find_spec("rudalle")
        if spec is None:
            pytest.skip("rudalle is not installed (the compat extra)")
        base = spec.submodule_search_locations[0]
    parts = name.split(".")
    for i in range(1, len(parts)):
        pkg = ".".join(parts[:i])
        if not getattr(sys.modules.get(pkg), "__t2i_stub__", False):
            stub = types.ModuleType(pkg)
            stub.__path__ = ["/".join([base, *parts[1:i]])]
            stub.__t2i_stub__ = True
            sys.modules[pkg] = stub
    return importlib.import_module(name)
