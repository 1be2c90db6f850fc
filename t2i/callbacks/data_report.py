"""Report skipped samples and truncated captions every epoch; stop when too much data is bad."""

from __future__ import annotations

import logging

import pytorch_lightning as pl
import torch.distributed as dist

from t2i.data.skips import SkipLog

log = logging.getLogger(__name__)


def gather(slog: SkipLog) -> SkipLog:
    """The counts of every DDP rank merged (every rank gets the same result); ``slog`` alone otherwise."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return slog
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, slog.to_dict())
    merged = SkipLog(slog.max_bad_fraction, name=slog.name, keep_examples=slog.keep_examples)
    for part in parts:
        merged.merge(part)
    return merged


class DataReport(pl.Callback):
    """At each epoch end: merge the datamodule's per-split :class:`~t2i.data.skips.SkipLog` over all
    ranks, print it (rank zero) when anything was skipped, log ``<split>/skipped``, and raise
    :class:`~t2i.data.skips.DataError` on every rank past ``max_bad_fraction``."""

    def _report(self, trainer: pl.Trainer, pl_module: pl.LightningModule, split: str) -> None:
        dm = trainer.datamodule
        local = getattr(dm, "logs", {}).get(split)
        if local is None:
            return
        slog = gather(local)
        if slog is local:
            slog = SkipLog(local.max_bad_fraction, name=local.name, keep_examples=local.keep_examples).merge(local)
        local.reset()  # the next epoch counts afresh
        if slog.total == 0:
            return
        if slog.n_bad and trainer.is_global_zero:
            log.warning(slog.summary())
        pl_module.log(f"{split}/skipped", float(slog.n_bad))  # already summed over ranks
        tok = getattr(dm, "tokenizer", None)
        if tok is not None and tok.n_truncated and trainer.is_global_zero:
            log.info(tok.truncation_report())
        slog.check()

    def on_train_epoch_end(self, trainer, pl_module):
        self._report(trainer, pl_module, "train")

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._report(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module):
        self._report(trainer, pl_module, "test")
