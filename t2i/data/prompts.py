"""Prompts as the commands and the Python API receive them: a string, a list of strings, or a text file.

* :func:`prompt_list`: a string is **one** prompt (never its characters); a list holds one prompt per entry.
* :func:`read_prompts_file`: one caption a line, UTF-8 (a BOM is dropped), blank lines skipped; a file that is
  not UTF-8 text is one error naming the file and the byte offset.
* :func:`read_prompts`: ``prompts`` and ``prompts_file`` together, as ``t2i-generate`` takes them.
* :func:`check_output_folder`: an ``output=`` that must be a folder (created when missing).

Every refusal is one :class:`~t2i.errors.ConfigError` naming the key the user wrote.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from t2i import checks
from t2i.errors import ConfigError


def prompt_list(prompts, key: str = "prompts") -> list[str]:
    """``prompts`` as a list of non-blank strings: a string is one prompt, a list / tuple one per entry."""
    if prompts is None:
        prompts = []
    if isinstance(prompts, str):
        prompts = [prompts]
    elif isinstance(prompts, Mapping) or not hasattr(prompts, "__iter__"):
        raise ConfigError(f"{key}={prompts!r} is not a caption or a list of captions: write {key}='a caption' or "
                          f"{key}='[caption one, caption two]'")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, bytes | bytearray):
            raise ConfigError(f"{key}[{i}] is bytes, not text: decode it first")
        if p is None or isinstance(p, Mapping) or (not isinstance(p, str) and hasattr(p, "__iter__")):
            raise ConfigError(f"{key}[{i}]={p!r} is not a caption (a string): write one caption per entry")
        out.append(str(p))
    for i, p in enumerate(out):
        if not p.strip():
            raise ConfigError(f"{key}[{i}] is empty (it would sample without any caption): remove it or write "
                              f"the caption")
    return out


def read_prompts_file(path, key: str = "prompts_file") -> list[str]:
    """The captions of a text file, one a line (stripped; blank lines skipped)."""
    what = "text file, one caption a line"
    checks.file(what=what)(key, path)
    text = checks.utf8_file(key, path, what)
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        what = "only blank lines" if text else "it is empty"
        raise ConfigError(f"{key}={path} holds no caption ({what}): write one caption a line")
    return prompts


def read_prompts(prompts=None, prompts_file=None) -> list[str]:
    """``prompts`` (a caption or a list) followed by the lines of ``prompts_file``; at least one prompt."""
    out = prompt_list(prompts)
    if prompts_file:
        out += read_prompts_file(prompts_file)
    if not out:
        raise ConfigError("no prompts: pass prompts='[caption one, caption two]' or prompts_file=<one caption a line>")
    return out


def check_output_folder(path, key: str = "output") -> Path:
    """``path`` as a folder to write into: an existing file there is one error (before any model loads)."""
    checks.output_folder()(key, path)
    return Path(str(path)).expanduser()
