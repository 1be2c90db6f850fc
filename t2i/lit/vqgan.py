"""VQGANModule: trains :class:`t2i.models.vqgan.VQGAN` with :class:`t2i.losses.vqgan.VQGANLoss`.

Lightning 2 has no ``optimizer_idx``, so this uses manual optimization: every batch steps the
generator (encoder, quantizer, decoder), then, once ``loss.disc_start`` batches have passed, the
discriminator, each with gradient clipping and its own warm-up + cosine/constant LR schedule.
``self.step`` counts batches (Lightning's ``global_step`` counts both optimizers' steps); it is a buffer, so
checkpoints carry it, mirrored by a Python int so that a training step reads no tensor on the host.

Uneven and empty batches under DDP: each rank's losses are scaled by its share of the global batch
(:func:`t2i.distributed.batch_share`), so the averaged gradient is the global batch's mean. A rank whose
batch is empty (every sample undecodable) runs a stand-in sample weighted 0, so it joins every collective
(the gradient all-reduce, the quantizer's EMA and restart syncs) like the others; when no rank has a sample
the step is skipped on every rank (read on the host only by the empty ranks, which are then all of them).
The stand-in's codes do reach the quantizer's usage and EMA statistics on that one step.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from t2i.distributed import batch_share
from t2i.keys import TOKENIZER_KEY
from t2i.lit.metrics import image_metrics
from t2i.lit.optim import live_loss, lr_lambda, total_steps
from t2i.losses.vqgan import VQGANLoss
from t2i.models.quantizers import CodebookUsage
from t2i.models.records import tokenizer_entry
from t2i.models.vqgan import VQGAN


class VQGANModule(pl.LightningModule):
    def __init__(
        self,
        model: dict,
        loss: dict,
        lr: float = 1e-4,
        disc_lr: float | None = None,
        betas: tuple[float, float] = (0.5, 0.9),
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        schedule: str = "constant",
        total_steps: int | None = None,
        grad_clip: float | None = 1.0,
        gumbel_temperature: tuple[float, float, int] | None = None,
        channels_last: bool = False,
        fused_adam: bool | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.model = VQGAN(**model)
        self.loss = VQGANLoss(**loss)
        self.usage = CodebookUsage(self.model.codebook_size)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._step: int | None = None  # self.step on the host; read from the buffer once per fit / load
        if channels_last:  # faster convolutions on CPU (oneDNN) and on GPU tensor cores
            self.to(memory_format=torch.channels_last)

    def _input(self, batch) -> torch.Tensor:
        x = batch["image"]
        return x.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last else x

    # -- training ---------------------------------------------------------------------------
    def configure_optimizers(self):
        h = self.hparams
        gen = [p for n, p in self.named_parameters() if not n.startswith("loss.")]
        # fused (default on an accelerator): one kernel per step, and the step counts stay on the device (no
        # host read per step). On the CPU the default is the foreach kernel, whose step counts are CPU
        # tensors anyway; the fused CPU kernel rounds differently, and VQ training amplifies 1e-8 changes
        # into another codebook: the Shapes demo's measured tokenizer is the foreach one.
        fused = h.get("fused_adam")
        fused = self.device.type != "cpu" if fused is None else bool(fused)
        opt_g = torch.optim.AdamW(gen, lr=h.lr, betas=tuple(h.betas), weight_decay=h.weight_decay, fused=fused)
        opt_d = torch.optim.AdamW(self.loss.discriminator.parameters(), lr=h.disc_lr or h.lr, betas=tuple(h.betas),
                                  weight_decay=h.weight_decay, fused=fused)
        total = total_steps(self)
        sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, lr_lambda(h.warmup_steps, total, h.schedule))
        start = self.loss.disc_start
        d_total = total - start if total and total > start else None
        sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, lr_lambda(h.warmup_steps, d_total, h.schedule))
        return [opt_g, opt_d], [sched_g, sched_d]

    def _anneal_temperature(self) -> None:
        """Gumbel quantizer: exponential decay from ``start`` to ``end`` over ``steps`` batches."""
        if self.hparams.gumbel_temperature and hasattr(self.model.quantize, "temperature"):
            start, end, steps = self.hparams.gumbel_temperature
            t = min(1.0, self._host_step() / max(1, steps))
            self.model.quantize.temperature = start * (end / start) ** t
            self.log("train/temperature", self.model.quantize.temperature)

    def _host_step(self) -> int:
        if self._step is None:
            self._step = int(self.step)
        return self._step

    def on_train_start(self):
        self._step = int(self.step)  # after a resume: the checkpoint's count; the one host read of a fit

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._step = None

    def training_step(self, batch, batch_idx):
        x = self._input(batch)
        n = x.shape[0]
        share = batch_share(n, x.device)  # collective: every rank, every step
        if n == 0:  # every sample of this rank's batch failed to decode (counted by the datamodule)
            if not bool(torch.isfinite(share)):  # no rank has a sample (read only on an empty rank): skip everywhere
                return None
            x = x.new_zeros((1, *x.shape[1:]))  # a stand-in weighted 0: this rank still joins every collective
        opt_g, opt_d = self.optimizers()
        sched_g, sched_d = self.lr_schedulers()
        step = self._host_step()
        self._anneal_temperature()

        recon, qloss, info = self.model(x)
        g_loss, g_logs = self.loss.generator_loss(x, recon, qloss, self.model.last_layer, step)
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(g_loss * share)
        self.clip_gradients(opt_g, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")
        opt_g.step()
        sched_g.step()

        logs = {f"train/{k}": v for k, v in g_logs.items()}
        if self.loss.gan_active(step):
            d_loss, d_logs = self.loss.discriminator_loss(x, recon.detach(), step)
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss * share)
            self.clip_gradients(opt_d, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")
            opt_d.step()
            sched_d.step()
            logs.update({f"train/{k}": v for k, v in d_logs.items()})
        if "perplexity" in info:
            logs["train/codebook_perplexity"] = info["perplexity"]
        self.step += 1
        self._step = step + 1
        if n == 0:  # the stand-in's losses are not this rank's data
            return
        self.log_dict(logs, prog_bar=False)
        self.log("train/loss", g_logs["total_loss"], prog_bar=live_loss(self))

    # -- evaluation -------------------------------------------------------------------------
    def _eval_step(self, batch, split: str):
        x = self._input(batch)
        if x.shape[0] == 0:
            return
        recon, qloss, info = self.model(x)
        nll, logs = self.loss.reconstruction(x, recon)
        logs = {f"{split}/{k}": v for k, v in logs.items()}
        logs[f"{split}/quant_loss"] = qloss.detach()
        logs.update({f"{split}/{k}": v for k, v in image_metrics(x, recon).items()})
        self.log_dict(logs, prog_bar=split == "val", sync_dist=True, batch_size=x.shape[0])
        self.usage.update(info["codes"])

    def _usage_epoch_end(self, split: str):
        stats = self.usage.compute()
        self.log(f"{split}/codebook_perplexity", stats["perplexity"], sync_dist=False)
        self.log(f"{split}/dead_codes", stats["dead_codes"], prog_bar=split == "val", sync_dist=False)
        self.usage.reset()

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self):
        self._usage_epoch_end("val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def on_test_epoch_end(self):
        self._usage_epoch_end("test")

    @torch.no_grad()
    def log_images(self, batch) -> dict[str, torch.Tensor]:
        x = batch["image"]
        recon, _, _ = self.model(x)
        return {"inputs": x, "reconstructions": recon.clamp(-1, 1)}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[TOKENIZER_KEY] = tokenizer_entry("t2i.models.vqgan.VQGAN", dict(self.hparams.model), "model.")
