"""Which device and which autocast dtype a command or a pipeline runs with (one ConfigError for a bad name), and
the thread count a launcher may change while a command runs (:class:`ThreadsFile`)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from t2i.errors import ConfigError

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
OFF = (None, False, "null", "none", "false", "fp32", "float32", torch.float32)


def pick_device(name="auto", key: str = "device") -> torch.device:
    """``auto``: this rank's GPU (LOCAL_RANK) when CUDA is there, else the CPU; ``cpu``, ``cuda``, ``cuda:N``."""
    if isinstance(name, torch.device):
        name = str(name)
    name = str(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{key}={name} but no CUDA device is visible; use {key}=cpu or {key}=auto")
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{key}={name}: not a torch device; use auto, cpu, cuda or cuda:N") from None


def autocast_dtype(value, device: torch.device, key: str = "autocast") -> torch.dtype | None:
    """``auto`` (bf16 on CUDA, off elsewhere), ``bf16``, ``fp16`` (a GPU only) or off (``null`` / ``fp32``);
    a ``torch.dtype`` is taken as it is."""
    if value in OFF:
        return None
    if value == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    dtype = value if isinstance(value, torch.dtype) else DTYPES.get(value)
    if dtype not in (torch.bfloat16, torch.float16):
        raise ConfigError(f"{key}={value!r}: use auto, bf16, fp16 or null")
    if dtype is torch.float16 and device.type == "cpu":
        raise ConfigError(f"{key}=fp16 needs a GPU; use {key}=bf16 or null on the CPU")
    return dtype


THREADS_ENV = "T2I_THREADS_FILE"
log = logging.getLogger(__name__)


class ThreadsFile:
    """Follow a thread count that the launcher of this process may change while it runs (``t2i-demo``'s stage
    runner gives a stage the cores of one that ended): :meth:`check`, called between batches, applies the
    count in ``path`` with ``torch.set_num_threads``, at most every ``every_s`` seconds."""

    def __init__(self, path, every_s: float = 2.0):
        self.path, self.every_s, self._last = Path(path), float(every_s), float("-inf")

    def read(self) -> int | None:
        """The count in the file (a positive integer), or None when it is missing or unreadable."""
        try:
            n = int(self.path.read_text().strip())
        except (OSError, ValueError):
            return None
        return n if n > 0 else None

    def check(self) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s:
            return
        self._last = now
        n = self.read()
        if n is not None and n != torch.get_num_threads():
            log.info("threads: %d -> %d (%s)", torch.get_num_threads(), n, self.path)
            torch.set_num_threads(n)


def threads_file() -> ThreadsFile | None:
    """The :class:`ThreadsFile` named by ``$T2I_THREADS_FILE``, or None when it is not set."""
    path = os.environ.get(THREADS_ENV)
    return ThreadsFile(path) if path else None
