"""One callback for every module's ``log_images(batch) -> dict[str, Tensor]``: PNG grids on disk
(``<run>/images/``; small images upscaled to cells of at least ``min_cell`` px, nearest, in grey frames,
see :func:`t2i.viz.sample_grid`) and, when a W&B logger is attached, ``wandb.Image`` panels. Rank zero only (under FSDP from a gathered, unsharded copy)."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from torchvision.utils import save_image

from t2i.distributed import unsharded
from t2i.viz import sample_grid


class ImageLogger(pl.Callback):
    def __init__(self, every_n_epochs: int = 1, max_images: int = 16, dirname: str = "images", min_cell: int = 128):
        self.every_n_epochs, self.max_images, self.dirname = every_n_epochs, max_images, dirname
        self.min_cell = min_cell  # small images are upscaled (nearest) to cells of at least this many px
        self._batch = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0 and not trainer.sanity_checking and isinstance(batch, dict):
            self._batch = {k: v[: self.max_images] if hasattr(v, "__getitem__") else v for k, v in batch.items()}

    def on_validation_epoch_end(self, trainer, pl_module):
        batch, self._batch = self._batch, None
        if batch is None or not hasattr(pl_module, "log_images"):
            return
        if trainer.current_epoch % self.every_n_epochs:
            return
        module = unsharded(trainer, pl_module)  # FSDP: every rank helps gather, rank 0 gets a plain copy
        if not trainer.is_global_zero:
            return
        was_training = module.training
        module.eval()
        with torch.no_grad():
            images = module.log_images(batch)
        module.train(was_training)
        self.save(trainer, images, f"val_epoch{trainer.current_epoch:03d}")

    def save(self, trainer, images: dict, stem: str) -> dict[str, Path]:
        out = Path(trainer.default_root_dir) / self.dirname
        out.mkdir(parents=True, exist_ok=True)
        paths = {}
        for name, x in images.items():
            grid = sample_grid(x, nrow=min(8, len(x)), min_cell=self.min_cell, value_range=(-1.0, 1.0))
            paths[name] = out / f"{stem}_{name}.png"
            save_image(grid, paths[name])
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.log_image(key="images", images=[str(p) for p in paths.values()],
                                 caption=list(paths), step=trainer.global_step)
        return paths
