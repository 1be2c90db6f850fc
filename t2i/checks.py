"""Typed checks of command keys: one :class:`~t2i.errors.ConfigError` naming the key, before anything runs.

Each factory returns a checker ``check(key, value)``; :func:`check_keys` applies a ``{dotted key: checker}``
table to a config (a mapping, or an OmegaConf node read with dotted keys). A value from the command line
arrives as Hydra parsed it: ``abc`` is a string, ``[1,2]`` a list, ``''`` an empty string, ``nan`` / ``inf``
floats. Booleans are never numbers here (``true`` is not ``1``), and an integer key refuses ``1.5``.

``optional=True``: ``None`` (``null``) is accepted; for paths and texts so is ``''`` (it clears the option).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from numbers import Integral, Real
from pathlib import Path

from t2i.errors import ConfigError

Checker = Callable[[str, object], None]
_UNSET = object()


def show(value) -> str:
    """The value as the user would write it back (``''`` for the empty string, lists as ``[1, 2]``)."""
    if isinstance(value, str):
        return value if value else "''"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if not isinstance(value, Real) and hasattr(value, "__iter__") and not isinstance(value, Mapping):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {show(v)}" for k, v in value.items()) + "}"
    return str(value)


def _bad(key: str, value, rule: str):
    raise ConfigError(f"{key}={show(value)} {rule}")


def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def count(minimum: int = 1, optional: bool = False, hint: str = "") -> Checker:
    """An integer >= ``minimum``."""
    def check(key, value):
        if value is None and optional:
            return
        if not _is_int(value) or value < minimum:
            _bad(key, value, f"must be an integer >= {minimum}" + (" (or null)" if optional else "") + hint)
    return check


def integer(optional: bool = False) -> Checker:
    """Any integer (a seed)."""
    def check(key, value):
        if value is None and optional:
            return
        if not _is_int(value):
            _bad(key, value, "must be an integer")
    return check


def number(low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False,
           optional: bool = False, hint: str = "") -> Checker:
    """A finite number in the interval given (``low_open``/``high_open``: the bound itself is excluded)."""
    lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
    hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
    if low is not None and high is not None:
        rule = f"must be a number in {lo}, {hi}"
    elif low is not None:
        rule = f"must be a number {'>' if low_open else '>='} {low:g}"
    elif high is not None:
        rule = f"must be a number {'<' if high_open else '<='} {high:g}"
    else:
        rule = "must be a finite number"

    def check(key, value):
        if value is None and optional:
            return
        if not _is_number(value) or not math.isfinite(value):
            _bad(key, value, rule + (" (or null)" if optional else "") + hint)
        v = float(value)
        if low is not None and (v < low or (low_open and v == low)):
            _bad(key, value, rule + hint)
        if high is not None and (v > high or (high_open and v == high)):
            _bad(key, value, rule + hint)
    return check


def fraction(optional: bool = False) -> Checker:
    return number(0, 1, optional=optional)


def boolean() -> Checker:
    def check(key, value):
        if not isinstance(value, bool):
            _bad(key, value, "must be true or false")
    return check


def choice(*choices, optional: bool = False) -> Checker:
    """One of ``choices`` (compared as written; ``null`` too with ``optional``)."""
    names = ", ".join(show(c) for c in choices)

    def check(key, value):
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, str | Real) or value not in choices:
            _bad(key, value, f"is unknown; use one of {names}" + (" (or null)" if optional else ""))
    return check


def text(optional: bool = False) -> Checker:
    """A non-empty string."""
    def check(key, value):
        if optional and value in (None, ""):
            return
        if not isinstance(value, str) or not value.strip():
            _bad(key, value, "must be a non-empty text")
    return check


def _path_value(key, value, optional: bool, what: str):
    if optional and value in (None, ""):
        return None
    if value is None or value == "":
        raise ConfigError(f"{key} is not set: give the {what} with `{key}=...`")
    if not isinstance(value, str | Path):
        _bad(key, value, f"is not a path: give one {what}")
    return Path(str(value)).expanduser()


def utf8_file(key: str, path, what: str = "text file") -> str:
    """The text of ``path``, which must be UTF-8 (a BOM is dropped): one error naming the key and the first bad
    byte otherwise, or the first NUL byte (a binary file)."""
    p = Path(str(path)).expanduser()
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{key}={path} cannot be read ({e.strerror or e})") from None
    try:
        text_ = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{key}={path} is not UTF-8 text (byte {e.start}: {data[e.start:e.start + 4]!r}); give "
                          f"a UTF-8 {what}") from None
    if "\x00" in text_:
        raise ConfigError(f"{key}={path} holds a NUL byte at byte {data.index(0)} (a binary file?); give a UTF-8 "
                          f"{what}")
    return text_


def file(optional: bool = False, what: str = "file", utf8: bool = False) -> Checker:
    """An existing file (not a folder); ``utf8``: holding UTF-8 text."""
    def check(key, value):
        p = _path_value(key, value, optional, what)
        if p is None:
            return
        if not p.exists():
            raise ConfigError(f"{key}={value}: no such file (give the {what})")
        if p.is_dir():
            raise ConfigError(f"{key}={value} is a folder, not a file: give the {what}")
        if utf8:
            utf8_file(key, p, what)
    return check


def folder(optional: bool = False, what: str = "folder") -> Checker:
    """An existing folder."""
    def check(key, value):
        p = _path_value(key, value, optional, what)
        if p is None:
            return
        if not p.exists():
            raise ConfigError(f"{key}={value}: no such folder (give the {what})")
        if not p.is_dir():
            raise ConfigError(f"{key}={value} is a file, not a folder: give the {what}")
    return check


def path(optional: bool = False, what: str = "file or folder", globs: bool = False) -> Checker:
    """An existing file or folder (``globs``: or a pattern that matches something)."""
    def check(key, value):
        p = _path_value(key, value, optional, what)
        if p is None or p.exists():
            return
        if globs and any(c in str(p) for c in "*?[") and list(Path(p.anchor or ".").glob(
                str(p.relative_to(p.anchor)) if p.is_absolute() else str(p))):
            return
        raise ConfigError(f"{key}={value}: no such {what}")
    return check


def output_folder(optional: bool = False, what: str = "folder to write into") -> Checker:
    """A folder to write into: missing (it is created) or a folder, never a file; nor below a file."""
    def check(key, value):
        if optional and value in (None, ""):
            return
        if value is None or (isinstance(value, str) and not value.strip()):
            raise ConfigError(f"{key} is empty: give a {what}")
        if not isinstance(value, str | Path):
            _bad(key, value, f"is not a path: give one {what}")
        p = Path(str(value)).expanduser()
        if p.exists() and not p.is_dir():
            raise ConfigError(f"{key}={value} is a file, not a folder: pass a folder (it is created when missing)")
        for parent in p.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise ConfigError(f"{key}={value}: {parent} is a file, so the folder cannot be created there")
                break
    return check


def output_file(optional: bool = False, what: str = "file to write") -> Checker:
    """A file to write: not a folder, and not below a file."""
    def check(key, value):
        if optional and value in (None, ""):
            return
        if value is None or (isinstance(value, str) and not value.strip()):
            raise ConfigError(f"{key} is empty: give the {what}")
        if not isinstance(value, str | Path):
            _bad(key, value, f"is not a path: give one {what}")
        p = Path(str(value)).expanduser()
        if p.is_dir():
            raise ConfigError(f"{key}={value} is a folder: give the {what} (e.g. {key}={Path(str(value)) / 'x.ckpt'})")
        for parent in p.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise ConfigError(f"{key}={value}: {parent} is a file, so the file cannot be written there")
                break
    return check


DEVICES = ("auto", "cpu", "cuda", "mps")


def device() -> Checker:
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` (or ``mps``); whether the device is there is the picker's check."""
    def check(key, value):
        ok = isinstance(value, str) and (value in DEVICES or (value.startswith("cuda:") and value[5:].isdigit()))
        if not ok:
            _bad(key, value, "must be auto, cpu, cuda or cuda:N (N a GPU index)")
    return check


def check_keys(cfg, table: Mapping[str, Checker]) -> None:
    """Apply each checker to its key's value (keys absent from ``cfg`` are skipped)."""
    for key, checker in table.items():
        value = _get(cfg, key)
        if value is _UNSET:
            continue
        checker(key, _plain(value))


def _get(cfg, key: str):
    node = cfg
    for part in key.split("."):
        try:
            if part not in node:
                return _UNSET
            node = node[part]
        except TypeError:
            return _UNSET
    return node


def _plain(value):
    """OmegaConf lists / dicts as Python ones (without importing omegaconf here)."""
    if hasattr(value, "_content") and hasattr(value, "items"):
        return {k: _plain(v) for k, v in value.items()}
    if hasattr(value, "_content") and hasattr(value, "__iter__"):
        return [_plain(v) for v in value]
    return value
