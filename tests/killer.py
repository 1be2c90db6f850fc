"""A test callback: SIGKILL this training process at a chosen point, as ``kill -9`` from outside would,
but at a reproducible place (a race with a polling test would land anywhere)."""

import os
import signal

import pytorch_lightning as pl


class Killer(pl.Callback):
    """Kill at the start of training batch ``batch`` (its index in the epoch) of epoch ``epoch``: after
    every checkpoint of the batches and validations before it, before anything of that batch runs."""

    def __init__(self, epoch: int, batch: int = 0):
        self.epoch, self.batch = int(epoch), int(batch)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            os.kill(os.getpid(), signal.SIGKILL)
