"""SPADEModule: semantic image synthesis (SPADE / GauGAN) -- label map (+ instance edges) -> image.

    t2i-train experiment=shapes_spade

Batches: ``image`` ``[B, 3, H, W]`` in [-1, 1], ``label`` ``[B, H, W]`` class ids, optionally ``instance``
``[B, H, W]``, ``key``. Manual optimization: per batch one generator (+ style encoder) step on the hinge
GAN + feature matching + perceptual (+ KL) loss, then one discriminator step on the same generated images,
with two Adam optimizers at TTUR rates (``lr_g``, ``lr_d``; betas (0, 0.9) as the paper's TTUR setting).
Non-finite steps are skipped on every rank (fused Adam + :class:`t2i.lit.optim.StepGuard`, one guard per
optimizer); ``max_bad_steps`` in a row raise. A rank whose batch is empty runs a stand-in sample weighted 0
(:func:`t2i.distributed.batch_share`), so DDP never waits on it; when every rank's batch is empty the step is
skipped everywhere. ``ema_decay`` keeps an EMA copy of the generator used for validation, images and
:meth:`generate`.

``model``: the generator / encoder arguments plus ``num_classes`` and ``use_instance`` (the input has
``num_classes (+1)`` channels); ``loss``: :class:`t2i.losses.spade.SPADELoss` arguments. Everything a
rebuild needs is in the hyper-parameters: ``SPADEModule(**ckpt["hyper_parameters"])`` + the state dict.
"""

from __future__ import annotations

import copy
import math

import pytorch_lightning as pl
import torch

from t2i.distributed import batch_share
from t2i.errors import ConfigError, T2IError
from t2i.lit.metrics import image_metrics
from t2i.lit.optim import StepGuard, clip_grad_norm, ema_update, live_loss, lr_lambda, total_steps
from t2i.losses.spade import SPADELoss
from t2i.models.spade import SPADEGenerator, StyleEncoder, label_input

SCHEDULES = ("constant", "cosine", "linear")


def linear_decay(start: float, total: int | None):
    """The paper's schedule: constant, then linear to 0 over the steps after ``start * total``."""

    def f(step: int) -> float:
        if not total:
            return 1.0
        begin = int(start * total)
        return 1.0 if step < begin else max(0.0, 1.0 - (step - begin) / max(1, total - begin))

    return f


def palette(num_classes: int) -> torch.Tensor:
    """A fixed colour per class in [-1, 1] (class 0 black), for pictures of label maps."""
    colours = torch.rand(num_classes, 3, generator=torch.Generator().manual_seed(7)) * 1.6 - 0.6
    colours[0] = -1.0
    return colours


class SPADEModule(pl.LightningModule):
    def __init__(self, model: dict, loss: dict | None = None, lr_g: float = 1e-4, lr_d: float = 4e-4,
                 betas: tuple[float, float] = (0.0, 0.9), schedule: str = "constant", decay_start: float = 0.5,
                 warmup_steps: int = 0, total_steps: int | None = None, grad_clip: float | None = None,
                 ema_decay: float | None = None, max_bad_steps: int = 20, sample: dict | None = None):
        super().__init__()
        if schedule not in SCHEDULES:
            raise ConfigError(f"model.schedule={schedule!r} is unknown; use one of {', '.join(SCHEDULES)}")
        self.save_hyperparameters()
        m = dict(model)
        if m.get("num_classes") is None:
            raise ConfigError("model.model.num_classes is not set (it is data.num_classes: pick a label-map data "
                              "config, e.g. data=shapes_layout)")
        self.num_classes = int(m.pop("num_classes"))
        self.use_instance = bool(m.pop("use_instance", False))
        nef = m.pop("nef", 64)
        label_nc = self.num_classes + int(self.use_instance)
        self.generator = SPADEGenerator(label_nc, **m)
        self.encoder = None
        if self.generator.use_vae:
            self.encoder = StyleEncoder(m.get("image_size", 256), m.get("aspect_ratio", 1.0), nef,
                                        self.generator.z_dim, m.get("spectral", True))
        self.loss = SPADELoss(label_nc, **dict(loss or {}))
        self.ema = copy.deepcopy(self.generator).requires_grad_(False) if ema_decay else None
        self.automatic_optimization = False
        self.g_guard, self.d_guard = StepGuard(max_bad_steps), StepGuard(max_bad_steps)
        self._batches = 0

    # -- inputs ------------------------------------------------------------------------------
    def seg_input(self, label: torch.Tensor, instance: torch.Tensor | None = None) -> torch.Tensor:
        return label_input(label.to(self.device), self.num_classes,
                           instance.to(self.device) if instance is not None else None, self.use_instance)

    def sampling_generator(self) -> SPADEGenerator:
        return self.ema if self.ema is not None else self.generator

    def style(self, images: torch.Tensor):
        """``(z, mu, logvar)``: ``z`` drawn with the reparameterisation trick from the encoder's posterior."""
        mu, logvar = self.encoder(images)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return z, mu, logvar

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.loss.check_perceptual()  # a missing VGG file fails before the first step

    # -- training ----------------------------------------------------------------------------
    def configure_optimizers(self):
        h = self.hparams
        gen = list(self.generator.parameters()) + (list(self.encoder.parameters()) if self.encoder else [])
        betas = tuple(float(b) for b in h.betas)
        opt_g = torch.optim.Adam(gen, lr=h.lr_g, betas=betas, fused=True)
        opt_d = torch.optim.Adam(self.loss.discriminator.parameters(), lr=h.lr_d, betas=betas, fused=True)
        total = total_steps(self)  # batches: the trainer counts two optimizer steps per batch in max_steps
        if total and not h.total_steps and self._trainer is not None and (self.trainer.max_steps or -1) > 0:
            total = min(total, math.ceil(self.trainer.max_steps / 2))
        if h.schedule == "linear":
            f = linear_decay(h.decay_start, total)
        else:
            f = lr_lambda(h.warmup_steps, total, h.schedule)
        scheds = [torch.optim.lr_scheduler.LambdaLR(o, f) for o in (opt_g, opt_d)]
        return [opt_g, opt_d], scheds

    def _step(self, opt, guard: StepGuard, loss: torch.Tensor) -> None:
        raw = getattr(opt, "optimizer", opt)
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        guard.after_backward(raw, clip_grad_norm(self, raw, self.hparams.grad_clip))
        opt.step()

    def training_step(self, batch, batch_idx):
        label, real, instance = batch["label"], batch["image"], batch.get("instance")
        n = label.shape[0]
        share = batch_share(n, real.device)
        if n == 0:  # a stand-in sample weighted 0: this rank still joins every collective
            label, real = label.new_zeros((1, *label.shape[1:])), real.new_zeros((1, *real.shape[1:]))
            instance = instance.new_zeros((1, *instance.shape[1:])) if instance is not None else None
        seg = self.seg_input(label, instance)
        opt_g, opt_d = self.optimizers()
        sched_g, sched_d = self.lr_schedulers()

        z = mu = logvar = None
        if self.encoder is not None:
            z, mu, logvar = self.style(real)
        fake = self.generator(seg, z)
        g_loss, g_logs = self.loss.generator_loss(seg, real, fake, mu, logvar)
        self._step(opt_g, self.g_guard, g_loss * share)
        sched_g.step()
        if self.ema is not None:
            ema_update(self.ema, self.generator, self.hparams.ema_decay, self.g_guard.ok)
            with torch.no_grad():  # running statistics and spectral-norm vectors follow the model
                for e, b in zip(self.ema.buffers(), self.generator.buffers()):
                    e.copy_(b)

        d_loss, d_logs = self.loss.discriminator_loss(seg, real, fake.detach())
        self._step(opt_d, self.d_guard, d_loss * share)
        sched_d.step()

        bs = max(n, 1)
        self.log_dict({f"train/{k}": v for k, v in {**g_logs, **d_logs}.items()}, batch_size=bs)
        self.log("train/loss", g_logs["total_loss"], prog_bar=live_loss(self), batch_size=bs)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self._batches += 1
        self.log("train/skipped_steps", (self.g_guard.skipped + self.d_guard.skipped).float())
        for guard in (self.g_guard, self.d_guard):
            guard.check(self._batches, self._too_many_bad_steps)

    def on_train_epoch_end(self):
        for guard in (self.g_guard, self.d_guard):
            guard.check(0, self._too_many_bad_steps)

    def _too_many_bad_steps(self, n: int) -> T2IError:
        return T2IError(f"the SPADE generator or discriminator loss was NaN/inf for {n} steps in a row (an empty "
                        f"batch counts too; by batch {self._batches}); lower model.lr_g / model.lr_d or set "
                        "model.grad_clip")

    # -- evaluation --------------------------------------------------------------------------
    def _eval_step(self, batch, split: str):
        label, real = batch["label"], batch["image"]
        if label.shape[0] == 0:
            return
        seg = self.seg_input(label, batch.get("instance"))
        mu = logvar = None
        if self.encoder is not None:
            mu, logvar = self.encoder(real)
        fake = self.sampling_generator()(seg, mu)  # the real image's style (its posterior mean)
        _, logs = self.loss.generator_loss(seg, real, fake, mu, logvar)
        _, d_logs = self.loss.discriminator_loss(seg, real, fake)
        logs = {**logs, **d_logs, "l1": (fake - real).abs().mean(), **image_metrics(real, fake)}
        self.log_dict({f"{split}/{k}": v for k, v in logs.items()}, prog_bar=split == "val", sync_dist=True,
                      batch_size=label.shape[0])

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    # -- generation --------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, label: torch.Tensor, instance: torch.Tensor | None = None, style=None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Label maps ``[B, H, W]`` -> images ``[B, 3, H, W]`` in [-1, 1] (the EMA generator when there is one).

        ``style``: None -> with a style encoder the prior's mean (``z = 0``); ``"random"`` -> ``z ~ N(0, I)``
        drawn from ``generator``; images ``[B, 3, H, W]`` in [-1, 1] -> their encoded style (posterior mean).
        Without a style encoder the output depends on the map alone (``"random"`` gives the same images)."""
        g = self.sampling_generator()
        if tuple(label.shape[-2:]) != g.size:
            raise T2IError(f"label maps are {tuple(label.shape[-2:])} px; this model makes {g.size} "
                           "(resize the maps, nearest, to the model's size)")
        seg = self.seg_input(label, instance)
        was = self.training
        self.eval()
        try:
            z = None
            if g.use_vae:
                if style is None:
                    z = seg.new_zeros(seg.shape[0], g.z_dim)
                elif isinstance(style, str):
                    if style != "random":
                        raise T2IError(f"style={style!r}: use None, 'random' or a batch of style images")
                    dev = generator.device if generator is not None else seg.device
                    z = torch.randn(seg.shape[0], g.z_dim, generator=generator, device=dev).to(seg)
                else:
                    z, _ = self.encoder(style.to(seg))
            elif torch.is_tensor(style):
                raise T2IError("this SPADE model has no style encoder (trained with model.model.use_vae=false): "
                               "generate with style=None")
            return g(seg, z).clamp(-1, 1)
        finally:
            self.train(was)

    def colorize(self, label: torch.Tensor) -> torch.Tensor:
        """Label map ``[B, H, W]`` -> ``[B, 3, H, W]`` picture in [-1, 1]."""
        return palette(self.num_classes).to(label.device)[label.long()].permute(0, 3, 1, 2)

    @torch.no_grad()
    def log_images(self, batch) -> dict[str, torch.Tensor]:
        """One picture, a row per map: map | generated | real, then (with a style encoder) the real image's
        style and ``sample.styles`` random styles for the same map."""
        from t2i.viz import captioned_rows

        s = dict(self.hparams.sample or {})
        n = min(int(s.get("num_maps", 8)), batch["label"].shape[0])
        if n == 0:
            return {}
        label, real = batch["label"][:n], batch["image"][:n].to(self.device)
        instance = batch["instance"][:n] if "instance" in batch else None
        cols = [self.colorize(label.to(self.device)), self.generate(label, instance), real]
        if self.encoder is not None:
            cols.append(self.generate(label, instance, style=real))
            gen = torch.Generator(device=self.device).manual_seed(int(s.get("seed", 0)))
            cols += [self.generate(label, instance, "random", gen) for _ in range(int(s.get("styles", 3)))]
        rows = torch.stack(cols, 1).flatten(0, 1)
        keys = [str(k) for k in batch.get("key", [""] * n)[:n]]
        return {"synthesis": captioned_rows(rows, keys, per_row=len(cols), text_width=80, font_size=10)}
