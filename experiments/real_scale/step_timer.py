"""A measuring callback for the real-scale dry run: seconds of every training step and the process's peak RSS.

Passed to ``t2i-train`` as an extra callback (``+callbacks.step_timer._target_=step_timer.StepTimer``) with
this folder on ``PYTHONPATH``; it writes ``<path>`` (JSON) when training ends.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import pytorch_lightning as pl


class StepTimer(pl.Callback):
    def __init__(self, path: str):
        self.path, self.seconds, self._t0 = Path(path), [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seconds.append(time.perf_counter() - self._t0)

    def on_train_end(self, trainer, pl_module):
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"step_seconds": self.seconds, "peak_rss_mib": peak_mib}))
