"""Report skipped samples and truncated captions every epoch; stop when too much data is bad."""

from __future__ import annotations

import logging

import pytorch_lightning as pl

log = logging.getLogger(__name__)


class DataReport(pl.Callback):
    """Prints each split's :class:`~t2i.data.skips.SkipLog` at epoch end, logs ``<split>/skipped``,
    and raises :class:`~t2i.data.skips.DataError` past the datamodule's ``max_bad_fraction``."""

    def _report(self, trainer: pl.Trainer, pl_module: pl.LightningModule, split: str) -> None:
        dm = trainer.datamodule
        slog = getattr(dm, "logs", {}).get(split)
        if slog is None or slog.total == 0:
            return
        if slog.n_bad:
            log.warning(slog.summary())
        pl_module.log(f"{split}/skipped", float(slog.n_bad), rank_zero_only=True)
        tok = getattr(dm, "tokenizer", None)
        if tok is not None and tok.n_truncated:
            log.info(tok.truncation_report())
        slog.check()
        slog.reset()

    def on_train_epoch_end(self, trainer, pl_module):
        self._report(trainer, pl_module, "train")

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._report(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module):
        self._report(trainer, pl_module, "test")
