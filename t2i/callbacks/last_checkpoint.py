"""``checkpoints/last.ckpt``: the latest weights, written at every save point whatever the monitored metric did.

Lightning's ``ModelCheckpoint(save_last=True)`` refreshes ``last.ckpt`` only when it also keeps a new top-k
file, so with a monitored metric that stopped improving ``last.ckpt`` held the best epoch, not the latest,
and ``resume=auto`` went back in time. This is a plain ``ModelCheckpoint`` with nothing monitored and the
file name ``last`` (overwritten each time), plus a state key of its own so it can sit beside the
``best.ckpt`` one (Lightning refuses two checkpoint callbacks with the same key).

When the best-checkpoint callback has just written the same step (it runs first: Lightning keeps the
checkpoint callbacks' order), ``last.ckpt`` becomes a hard link to that file instead of a second
serialisation of the same state -- for a large model with its optimizer that halves the checkpoint time
and disk writes at every improving save point. A later ``best.ckpt`` is written to a new file renamed over
the old name, so the link keeps its own copy. Where links are impossible the file is copied.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pytorch_lightning.callbacks import ModelCheckpoint


class LastCheckpoint(ModelCheckpoint):
    def __init__(self, dirpath: str, every_n_train_steps: int | None = None, every_n_epochs: int | None = None):
        super().__init__(dirpath=dirpath, filename=self.CHECKPOINT_NAME_LAST, monitor=None, save_top_k=1,
                         save_last=False, every_n_train_steps=every_n_train_steps, every_n_epochs=every_n_epochs,
                         auto_insert_metric_name=False, enable_version_counter=False)

    @property
    def state_key(self) -> str:
        return "Last" + super().state_key

    def _twin(self, trainer) -> str | None:
        """The file another checkpoint callback wrote at this very step in this process (the same state),
        if any. Decided from counters every rank shares, so all ranks take the same branch."""
        if getattr(trainer.strategy, "_state_dict_type", "full") != "full":  # sharded: a folder per checkpoint
            return None
        for cb in trainer.checkpoint_callbacks:
            if (cb is not self and isinstance(cb, ModelCheckpoint) and cb._last_checkpoint_saved
                    and cb._last_global_step_saved == trainer.global_step
                    and cb.save_weights_only == self.save_weights_only):
                return cb._last_checkpoint_saved
        return None

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        twin = self._twin(trainer)
        if twin is None or os.path.abspath(twin) == os.path.abspath(filepath):
            return super()._save_checkpoint(trainer, filepath)
        if trainer.is_global_zero:
            target = Path(filepath)
            tmp = target.with_name(f".{target.name}.link{os.getpid()}")
            tmp.unlink(missing_ok=True)
            try:
                os.link(twin, tmp)
            except OSError:  # a file system without hard links
                shutil.copy2(twin, tmp)
            os.replace(tmp, target)
        trainer.strategy.barrier("t2i_last_checkpoint")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)
