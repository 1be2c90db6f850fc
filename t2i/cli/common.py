"""Shared pieces of the Hydra entry points: clear errors, config saving, instantiation of groups."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import t2i.conf  # noqa: F401  (registers the run-folder resolver before Hydra composes)
from t2i.errors import T2IError


def user_error(exc: BaseException) -> T2IError | None:
    """The :class:`T2IError` behind ``exc`` (Hydra wraps errors raised inside ``_target_`` calls)."""
    while exc is not None:
        if isinstance(exc, T2IError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def one_line(err: BaseException) -> str:
    """The message alone; errors re-raised from a DataLoader worker carry the worker's traceback text."""
    msg = str(err)
    if "Original Traceback" in msg:
        last = msg.strip().splitlines()[-1]
        msg = last.split(": ", 1)[1] if ": " in last else last
    return msg


def clear_errors(fn):
    """Turn user errors into one line on stderr and exit code 1 instead of a torch-deep traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (T2IError, InstantiationException) as exc:
            err = user_error(exc)
            if err is None:
                raise
            print(f"error: {one_line(err)}", file=sys.stderr)
            sys.exit(1)

    return wrapper


def instantiate_group(group: DictConfig | None) -> list:
    """Instantiate every entry of a group mapping (callbacks, loggers) that has a ``_target_``."""
    if not group:
        return []
    return [instantiate(conf) for conf in group.values() if isinstance(conf, DictConfig) and "_target_" in conf]


def save_config(cfg: DictConfig, output_dir: str | Path, name: str = "config.yaml") -> Path:
    """Write the fully resolved config next to the run's outputs."""
    path = Path(output_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return path


HELP_FLAGS = ("-h", "--help", "--hydra-help")


def first_word_as(key: str, usage: str) -> None:
    """``t2i-<tool> <word> key=value ...``: rewrite ``sys.argv`` so the first bare word becomes ``key=<word>``
    (``t2i-data convert``, ``t2i-import easynlp``, ``t2i-knowledge train``); with neither a word nor ``key=``
    (nor a help flag) print ``usage`` and exit with status 2."""
    args = sys.argv[1:]
    if args and "=" not in args[0] and not args[0].startswith("-"):
        sys.argv = [sys.argv[0], f"{key}={args[0]}", *args[1:]]
    elif not any(a.startswith(f"{key}=") for a in args) and not any(a in HELP_FLAGS for a in args):
        print(usage, file=sys.stderr)
        sys.exit(2)
