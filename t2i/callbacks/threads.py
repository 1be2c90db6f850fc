"""Follow a thread count the launcher changes while the run goes on (``t2i-demo``'s stage runner).

A stage of ``t2i-demo`` that shares the machine with another runs with a core's worth of threads; when the
other stage ends, the runner writes the new count into the file named by ``$T2I_THREADS_FILE``, and this
callback (added by ``t2i-train`` whenever that variable is set) applies it between batches
(:class:`t2i.devices.ThreadsFile`), so the freed core is used at once instead of idling until the stage ends.
"""

from __future__ import annotations

import pytorch_lightning as pl

from t2i.devices import ThreadsFile, threads_file


class FollowThreads(pl.Callback):
    """Apply the thread count in ``path`` between batches (at most every ``every_s`` seconds)."""

    def __init__(self, path, every_s: float = 2.0):
        self.file = ThreadsFile(path, every_s)

    def on_train_batch_end(self, *args, **kwargs) -> None:
        self.file.check()

    def on_validation_batch_end(self, *args, **kwargs) -> None:
        self.file.check()


def follow_threads() -> list[pl.Callback]:
    """``[FollowThreads]`` when ``$T2I_THREADS_FILE`` names a file to follow, else ``[]``."""
    found = threads_file()
    return [FollowThreads(found.path, found.every_s)] if found else []
