"""DVAEModule: trains :class:`t2i.models.dvae.DVAE` with the DALL·E ELBO (:class:`t2i.losses.dvae.DVAELoss`).

    t2i-train experiment=shapes_dvae

Logs ``train/{loss,rec_loss,kl,temperature,kl_weight}``; ``val/`` and ``test/`` ``{rec_loss,kl,psnr,ssim}`` of
the hard (argmax) reconstruction, and codebook usage over the whole epoch (``codebook_perplexity``,
``dead_codes``). Checkpoints carry the tokenizer entry read by :func:`t2i.pretrained.load_tokenizer`.
"""

from __future__ import annotations

import logging
import math

import pytorch_lightning as pl
import torch

from t2i.distributed import batch_share
from t2i.keys import TOKENIZER_KEY
from t2i.lit.metrics import image_metrics
from t2i.lit.optim import GuardedSteps, StepGuard, live_loss
from t2i.losses.dvae import DVAELoss, anneal
from t2i.models.dvae import DVAE
from t2i.models.quantizers import CodebookUsage
from t2i.models.records import tokenizer_entry

log = logging.getLogger(__name__)
LR_SCHEDULES = ("cosine", "exp", "linear", "constant")


class DVAEModule(GuardedSteps, pl.LightningModule):
    """The dVAE stage. ``model``: :class:`DVAE` arguments; ``loss``: :class:`DVAELoss` arguments.

    Optimizer: AdamW (the paper: betas 0.9/0.999, eps 1e-8, weight decay 1e-4), learning rate with a
    linear warm-up over ``warmup_steps`` then ``lr_schedule`` (``cosine``, ``exp``, ``linear``, ``constant``) down to
    ``min_lr`` at ``total_steps`` (default: the trainer's estimated number of steps). ``straight_through``
    uses hard one-hot codes in the forward pass with soft gradients.
    """

    bad_loss = "dVAE loss"

    def __init__(self, model: dict | None = None, loss: dict | None = None, lr: float = 1e-4, min_lr: float = 1.25e-6,
                 weight_decay: float = 1e-4, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 warmup_steps: int = 0, total_steps: int | None = None, lr_schedule: str = "cosine",
                 straight_through: bool = False, num_log_images: int = 8, max_bad_steps: int = 20):
        super().__init__()
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {lr_schedule!r}")
        self.save_hyperparameters()
        self.model = DVAE(**dict(model or {}))
        self.loss = DVAELoss(**dict(loss or {}))
        self.val_usage = CodebookUsage(self.model.codebook_size)
        self.test_usage = CodebookUsage(self.model.codebook_size)
        self.guard = StepGuard(max_bad_steps)

    # -- steps ------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int):
        """The ELBO, never None (under DDP every rank must run the backward pass): weighed by this rank's
        share of the global batch (ranks may have dropped undecodable images); a rank with an empty
        batch runs a stand-in image with weight 0; when every rank's is empty the step is skipped on all
        (:class:`t2i.lit.optim.StepGuard`)."""
        images = batch["image"]
        n = images.shape[0]
        share = batch_share(n, images.device)
        if n == 0:
            images = images.new_zeros((1, *images.shape[1:]))
        step = self.global_step
        tau = self.loss.temperature(step)
        stats, logits, _ = self.model(images, temperature=tau, hard=self.hparams.straight_through)
        loss, logs = self.loss(images, stats, logits, step)
        bs = max(n, 1)
        self.log("train/loss", loss, prog_bar=live_loss(self), batch_size=bs)
        self.log("train/rec_loss", logs["rec_loss"], batch_size=bs)
        self.log("train/kl", logs["kl"], batch_size=bs)
        self.log("train/temperature", tau, batch_size=bs)
        self.log("train/kl_weight", logs["kl_weight"], batch_size=bs)
        return loss * share

    def _eval_step(self, batch: dict, stage: str, usage: CodebookUsage) -> None:
        images = batch["image"]
        if images.shape[0] == 0:
            return
        stats, logits, _ = self.model(images)  # eval mode: hard argmax codes
        _, logs = self.loss(images, stats, logits, self.global_step)
        rec, kl = logs["rec_loss"], logs["kl"]
        usage.update(logits.argmax(dim=1))
        metrics = image_metrics(images, self.model.stats_to_images(stats))
        bs = images.shape[0]
        self.log(f"{stage}/rec_loss", rec, prog_bar=True, batch_size=bs, sync_dist=True)
        self.log(f"{stage}/kl", kl, batch_size=bs, sync_dist=True)
        self.log(f"{stage}/psnr", metrics["psnr"], prog_bar=True, batch_size=bs, sync_dist=True)
        self.log(f"{stage}/ssim", metrics["ssim"], batch_size=bs, sync_dist=True)

    def _log_usage(self, stage: str, usage: CodebookUsage) -> None:
        if not usage.update_called:
            return
        stats = usage.compute()  # synced over ranks
        self.log(f"{stage}/codebook_perplexity", stats["perplexity"])
        self.log(f"{stage}/dead_codes", stats["dead_codes"])
        usage.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_usage)

    def on_validation_epoch_end(self) -> None:
        self._log_usage("val", self.val_usage)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_usage)

    def on_test_epoch_end(self) -> None:
        self._log_usage("test", self.test_usage)

    # -- images, checkpoints, optimizer -------------------------------------------------------------
    @torch.no_grad()
    def log_images(self, batch: dict, n: int | None = None) -> dict[str, torch.Tensor]:
        """``inputs`` and their hard-code ``reconstructions``, both [N, 3, H, W] in [-1, 1]."""
        images = batch["image"][: n or self.hparams.num_log_images]
        was_training = self.model.training
        self.model.eval()
        try:
            rec = self.model.decode(self.model.encode(images)) if images.shape[0] else images.float()
        finally:
            self.model.train(was_training)
        return {"inputs": images.float(), "reconstructions": rec}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[TOKENIZER_KEY] = tokenizer_entry("t2i.models.dvae.DVAE", dict(self.model.config), "model.")

    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.AdamW(self.model.parameters(), lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps,
                                weight_decay=hp.weight_decay, fused=True)  # fused: StepGuard's device-side skip
        total = hp.total_steps or self._estimated_steps()
        warmup, floor = hp.warmup_steps, hp.min_lr / hp.lr if hp.lr > 0 else 1.0

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if hp.lr_schedule == "constant" or total is None:
                return 1.0
            return anneal(step - warmup, 1.0, floor, max(total - warmup, 1), hp.lr_schedule)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _estimated_steps(self) -> int | None:
        """The trainer's number of optimizer steps; None (no decay after warm-up) when it is unknown."""
        try:
            steps = self.trainer.estimated_stepping_batches
        except Exception:  # no trainer attached, or a loader without a length
            steps = math.inf
        if not math.isfinite(steps):
            log.warning("DVAEModule: number of training steps unknown; set model.total_steps for the lr decay")
            return None
        return int(steps)
