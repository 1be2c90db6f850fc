"""A test callback: SIGKILL this training process at a chosen point, as ``kill -9`` from outside would,
but at a reproducible place (a race with a polling test would land anywhere)."""

import os
import signal

import pytorch_lightning as pl
import torch


class Killer(pl.Callback):
    """Kill at the start of training batch ``batch`` (its index in the epoch) of epoch ``epoch``: after
    every checkpoint of the batches and validations before it, before anything of that batch runs."""

    def __init__(self, epoch: int, batch: int = 0):
        self.epoch, self.batch = int(epoch), int(batch)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            os.kill(os.getpid(), signal.SIGKILL)


class LazyBuild(pl.Callback):
    """Builds a module from the global RNG at the first validation of each process, as a metrics callback
    building its scorers on first use does: a resumed process builds it at a different point of the run
    than an uninterrupted one."""

    def __init__(self):
        self.built = None

    def on_validation_epoch_end(self, trainer, pl_module):
        if self.built is None and not trainer.sanity_checking:
            self.built = torch.nn.Linear(64, 64)  # default init draws from the global generator
