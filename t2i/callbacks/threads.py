"""Follow a thread count the launcher changes while the run goes on (``t2i-demo``'s stage runner).

A stage of ``t2i-demo`` that shares the machine with another runs with a core's worth of threads; when the
other stage ends, the runner writes the new count into the file named by ``$T2I_THREADS_FILE`` and this
callback (added by ``t2i-train`` whenever that variable is set) applies it with ``torch.set_num_threads``
between batches, so the freed core is used at once instead of idling until the stage ends.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

ENV = "T2I_THREADS_FILE"
log = logging.getLogger(__name__)


def read_threads(path: Path) -> int | None:
    """The count in ``path`` (a positive integer), or None when it is missing or unreadable."""
    try:
        n = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return n if n > 0 else None


class FollowThreads(pl.Callback):
    """Apply the thread count in ``path`` at most every ``every_s`` seconds, between batches."""

    def __init__(self, path, every_s: float = 2.0):
        self.path, self.every_s, self._last = Path(path), float(every_s), 0.0

    def check(self) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s:
            return
        self._last = now
        n = read_threads(self.path)
        if n is not None and n != torch.get_num_threads():
            log.info("threads: %d -> %d (%s)", torch.get_num_threads(), n, self.path)
            torch.set_num_threads(n)

    def on_train_batch_end(self, *args, **kwargs) -> None:
        self.check()

    def on_validation_batch_end(self, *args, **kwargs) -> None:
        self.check()


def follow_threads() -> list[pl.Callback]:
    """``[FollowThreads]`` when ``$T2I_THREADS_FILE`` names a file to follow, else ``[]``."""
    path = os.environ.get(ENV)
    return [FollowThreads(path)] if path else []
