"""A tiny real LightningModule for testing the training entry point before the stage models exist:
it predicts an image's mean colour from its caption tokens (learnable on Shapes: the colour is named)."""

import pytorch_lightning as pl
import torch
from torch import nn


class TinyModule(pl.LightningModule):
    def __init__(self, vocab_size: int = 2000, lr: float = 0.05):
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.EmbeddingBag(vocab_size, 3, mode="mean", padding_idx=0)

    def loss(self, batch):
        target = batch["image"].mean(dim=(2, 3))
        return nn.functional.mse_loss(self.embed(batch["text"]), target)

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.loss(batch), prog_bar=True)

    def test_step(self, batch, batch_idx):
        self.log("test/loss", self.loss(batch))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
