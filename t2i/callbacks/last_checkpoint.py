"""``checkpoints/last.ckpt``: the latest weights, written at every save point whatever the monitored metric did.

Lightning's ``ModelCheckpoint(save_last=True)`` refreshes ``last.ckpt`` only when it also keeps a new top-k
file, so with a monitored metric that stopped improving ``last.ckpt`` held the best epoch, not the latest,
and ``resume=auto`` went back in time. This is a plain ``ModelCheckpoint`` with nothing monitored and the
file name ``last`` (overwritten each time), plus a state key of its own so it can sit beside the
``best.ckpt`` one (Lightning refuses two checkpoint callbacks with the same key).
"""

from __future__ import annotations

from pytorch_lightning.callbacks import ModelCheckpoint


class LastCheckpoint(ModelCheckpoint):
    def __init__(self, dirpath: str, every_n_train_steps: int | None = None, every_n_epochs: int | None = None):
        super().__init__(dirpath=dirpath, filename=self.CHECKPOINT_NAME_LAST, monitor=None, save_top_k=1,
                         save_last=False, every_n_train_steps=every_n_train_steps, every_n_epochs=every_n_epochs,
                         auto_insert_metric_name=False, enable_version_counter=False)

    @property
    def state_key(self) -> str:
        return "Last" + super().state_key
