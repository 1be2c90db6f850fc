"""Put the resolved run config into every checkpoint, so a checkpoint says how it was made."""

from __future__ import annotations

import pytorch_lightning as pl


class ConfigSaver(pl.Callback):
    def __init__(self, config: dict):
        self.config = config

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["t2i_config"] = self.config
