"""A test callback: every rank's per-step training losses and sample keys, written as JSON when training ends."""

import json
from pathlib import Path

import pytorch_lightning as pl


class LossRecorder(pl.Callback):
    def __init__(self, path: str, keys: tuple[str, ...] = ("train/loss",)):
        self.path, self.keys, self.steps = path, tuple(keys), []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        m = trainer.callback_metrics
        step = {k: float(m[k]) for k in self.keys if k in m}
        step["batch"] = list(batch["key"]) if isinstance(batch, dict) and "key" in batch else None
        self.steps.append(step)

    def on_train_end(self, trainer, pl_module):
        out = Path(self.path)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.steps))
