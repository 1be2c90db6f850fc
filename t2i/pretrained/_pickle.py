"""Reading third-party checkpoints without running code stored in them.

Public checkpoints are pickles. ``torch.load(weights_only=True)`` reads plain tensor containers safely
but refuses any other class -- and Lightning 1.x checkpoints name ``ModelCheckpoint`` (their
``callbacks`` dict is keyed by the class), while the ``dall_e`` files are whole pickled modules.
:func:`read_weights` therefore tries, in order:

1. ``torch.load(weights_only=True)``;
2. an *inert* unpickler: tensors are rebuilt by torch's own tensor-rebuild functions and every other
   class or function the file names is replaced by a placeholder that executes nothing and only keeps
   the state pickle hands it (so the parameters of a pickled ``nn.Module`` tree can still be read);
3. full unpickling (``weights_only=False``), only when the caller passes ``trust_pickle=True``:
   it imports and runs whatever the file names, so use it only for files from a trusted source.

Each step's result goes through the caller's ``extract`` function; the first that yields weights wins.
"""

from __future__ import annotations

import _compat_pickle
import collections
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from t2i.errors import T2IError

T = TypeVar("T")


class Opaque:
    """Stand-in for an object of a class the inert unpickler does not trust.

    Construction, item assignment and ``append`` do nothing; ``__setstate__`` keeps the state (for a
    pickled ``nn.Module`` that is its ``__dict__``: ``_parameters``, ``_buffers``, ``_modules`` ...).
    ``pickled_name`` is the ``module.qualname`` the file asked for.
    """

    pickled_name = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.pickled_state = None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.pickled_state = state

    def __setitem__(self, key, value):
        pass

    def append(self, item):
        pass

    def extend(self, items):
        pass

    def __call__(self, *args, **kwargs):
        return self

    def __repr__(self):
        return f"<opaque {self.pickled_name}>"


_OPAQUE: dict[str, type[Opaque]] = {}


def _opaque(module: str, name: str) -> type[Opaque]:
    full = f"{module}.{name}"
    if full not in _OPAQUE:
        _OPAQUE[full] = type(name.rpartition(".")[2] or "Opaque", (Opaque,), {"pickled_name": full})
    return _OPAQUE[full]


def _trusted_globals() -> dict[str, Any]:
    """The only callables the inert unpickler hands out: torch's tensor-rebuild functions and dtypes,
    and a few harmless containers."""
    names = ["_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
             "_rebuild_parameter_with_state"]
    found = {f"torch._utils.{n}": getattr(torch._utils, n) for n in names if hasattr(torch._utils, n)}
    found.update({f"torch.{n}": v for n, v in vars(torch).items() if isinstance(v, torch.dtype)})
    found.update({"collections.OrderedDict": collections.OrderedDict, "builtins.set": set,
                  "builtins.frozenset": frozenset, "torch.Size": torch.Size})
    return found


class InertUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only :func:`_trusted_globals`; anything else becomes an
    :class:`Opaque` placeholder class (so no code named by the file is imported or run)."""

    _trusted: dict[str, Any] | None = None

    def find_class(self, module: str, name: str):
        if (module, name) in _compat_pickle.NAME_MAPPING:  # Python 2 names (protocol < 3 pickles)
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if InertUnpickler._trusted is None:
            InertUnpickler._trusted = _trusted_globals()
        return InertUnpickler._trusted.get(f"{module}.{name}") or _opaque(module, name)


class _InertPickleModule:
    """What ``torch.load(pickle_module=...)`` needs: ``Unpickler`` and ``load``."""

    Unpickler = InertUnpickler

    @staticmethod
    def load(file, **kwargs):
        return InertUnpickler(file, **kwargs).load()


def inert_load(path, map_location="cpu"):
    """Unpickle a torch file with :class:`InertUnpickler` (see the module docstring)."""
    return torch.load(path, map_location=map_location, weights_only=False, pickle_module=_InertPickleModule)


def tensor_mapping(obj) -> dict[str, torch.Tensor] | None:
    """``obj`` as ``{name: tensor}`` if it is a non-empty mapping of str to real tensors, else None."""
    if not isinstance(obj, Mapping) or not obj:
        return None
    if all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return {k: v for k, v in obj.items()}
    return None


def module_state(obj) -> dict[str, torch.Tensor] | None:
    """The ``state_dict`` of a pickled module tree: a real ``nn.Module`` or :class:`Opaque` placeholders
    whose kept state is a module ``__dict__``. None when ``obj`` is neither."""
    if isinstance(obj, nn.Module):
        return {k: v for k, v in obj.state_dict().items()}
    if not isinstance(obj, Opaque) or not isinstance(obj.pickled_state, Mapping):
        return None
    out: dict[str, torch.Tensor] = {}

    def walk(node, prefix: str) -> bool:
        if isinstance(node, nn.Module):
            out.update({prefix + k: v for k, v in node.state_dict().items()})
            return True
        state = node.pickled_state if isinstance(node, Opaque) else None
        if not isinstance(state, Mapping) or "_parameters" not in state:
            return False
        skip = set(state.get("_non_persistent_buffers_set") or ())
        for kind in ("_parameters", "_buffers"):
            for k, v in (state.get(kind) or {}).items():
                if isinstance(v, torch.Tensor) and k not in skip:
                    out[prefix + k] = v.detach()
        return all(child is None or walk(child, f"{prefix}{k}.") for k, child in (state.get("_modules") or {}).items())

    return out if walk(obj, "") and out else None


def _refusal(e: Exception) -> str:
    """The informative line of torch's weights-only error (it names the refused global)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    named = [ln for ln in lines if "WeightsUnpickler error" in ln]
    text = (named or lines or [type(e).__name__])[0]
    return text.split("WeightsUnpickler error:", 1)[-1].split(" Please use")[0].strip()[:300]


def _describe(obj) -> str:
    if isinstance(obj, Mapping):
        return f"a mapping with keys {sorted(map(str, obj))[:6]}"
    return f"a {type(obj).__name__}"


def read_weights(path, extract: Callable[[Any], T | None], *, what: str, trust_pickle: bool = False,
                 map_location="cpu") -> T:
    """Read ``path`` and return ``extract(obj)`` for the first loader whose result it accepts (not None).

    Loaders: weights-only, then inert, then (only with ``trust_pickle``) full unpickling. ``what``
    names the file in errors (e.g. "taming checkpoint").
    """
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise T2IError(f"{what} {path}: no such file")
    reasons = []
    try:
        obj = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        reasons.append(f"weights-only load refused it ({_refusal(e)})")
    except Exception as e:  # not a torch file at all, or truncated
        raise T2IError(f"{what} {path} cannot be read ({type(e).__name__}: {e})") from None
    else:  # a plain file: what it holds is all there is
        found = extract(obj)
        if found is None:
            raise T2IError(f"{what} {path}: no weights in the expected layout ({_describe(obj)})")
        return found
    try:
        found = extract(inert_load(p, map_location))
    except (pickle.UnpicklingError, EOFError) as e:  # every global resolves here: the stream itself is bad
        raise T2IError(f"{what} {path} cannot be read ({type(e).__name__}: {e})") from None
    except Exception as e:
        reasons.append(f"reading it without running its code failed ({type(e).__name__}: {e})")
    else:
        if found is not None:
            return found
        reasons.append("reading it without running its code gave no weights in the expected layout")
    if not trust_pickle:
        raise T2IError(
            f"{what} {path}: {'; '.join(reasons)}. The weights are inside pickled Python objects that only "
            "full unpickling can rebuild, and full unpickling can run arbitrary code from the file. If you "
            "trust where the file came from, pass trust_pickle=True (needs the packages the file's classes "
            "come from, e.g. taming-transformers or dall-e)")
    try:
        obj = torch.load(p, map_location=map_location, weights_only=False)
    except Exception as e:
        raise T2IError(f"{what} {path}: full unpickling failed ({type(e).__name__}: {e}); install the package "
                       "whose classes the file names") from None
    found = extract(obj)
    if found is None:
        raise T2IError(f"{what} {path}: no weights in the expected layout even after full unpickling "
                       f"(got {type(obj).__name__})")
    return found
