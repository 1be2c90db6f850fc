"""The VQGAN objective: pixel + perceptual reconstruction, codebook loss, and a PatchGAN adversary
whose generator weight adapts to the ratio of gradient norms at the decoder's last layer.

Differences from taming-transformers' ``VQLPIPSWithDiscriminator``, on purpose:
* before ``disc_start`` the discriminator is neither run nor stepped (taming runs it and multiplies
  by zero), and the adaptive weight is computed only when it is used;
* the GAN loss (hinge / non-saturating / vanilla), R1 and LeCam regularisation are options;
* LPIPS weights come from a local file (see :mod:`t2i.losses.perceptual`), never downloaded.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from t2i.models.discriminator import NLayerDiscriminator


def hinge_d(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def generator_adv(logits_fake: torch.Tensor, kind: str) -> torch.Tensor:
    """Generator's adversarial term: taming's ``-D(fake)`` for hinge/vanilla, softplus(-D) if non-saturating."""
    if kind == "non_saturating":
        return F.softplus(-logits_fake).mean()
    return -logits_fake.mean()


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """``||dNLL/dW|| / (||dG/dW|| + 1e-4)`` at the decoder's last layer ``W``, clamped, no gradient.

    Under DDP both gradients are averaged over ranks first, so the weight is the global batch's (as one
    process would compute it), not a per-rank value that differs between ranks (taming's behaviour)."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        both = torch.stack([nll_grad, g_grad])
        dist.all_reduce(both)
        nll_grad, g_grad = both / dist.get_world_size()
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


class VQGANLoss(nn.Module):
    """Reconstruction + codebook + adversarial loss for :class:`t2i.models.vqgan.VQGAN`.

    ``generator_loss`` and ``discriminator_loss`` are called by the LightningModule with its own
    step counter (``step``), so ``disc_start`` counts batches, not optimizer steps.
    """

    def __init__(
        self,
        disc_start: int = 10000,
        codebook_weight: float = 1.0,
        pixel_loss: str = "l1",
        pixel_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        vgg_path: str | None = None,
        disc_layers: int = 3,
        disc_ndf: int = 64,
        disc_norm: str = "batch",
        disc_in_channels: int = 3,
        disc_weight: float = 0.8,
        disc_factor: float = 1.0,
        disc_loss: str = "hinge",
        adaptive: bool = True,
        r1_weight: float = 0.0,
        lecam_weight: float = 0.0,
        lecam_decay: float = 0.999,
    ):
        super().__init__()
        if pixel_loss not in ("l1", "l2"):
            raise ValueError(f"pixel_loss={pixel_loss!r}: use l1 or l2")
        if disc_loss not in ("hinge", "vanilla", "non_saturating"):
            raise ValueError(f"disc_loss={disc_loss!r}: use hinge, vanilla or non_saturating")
        self.disc_start, self.codebook_weight = disc_start, codebook_weight
        self.pixel_loss, self.pixel_weight, self.perceptual_weight = pixel_loss, pixel_weight, perceptual_weight
        self.disc_weight, self.disc_factor, self.disc_loss, self.adaptive = disc_weight, disc_factor, disc_loss, adaptive
        self.r1_weight, self.lecam_weight, self.lecam_decay = r1_weight, lecam_weight, lecam_decay
        if perceptual_weight > 0:
            from t2i.losses.perceptual import LPIPS

            self.perceptual = LPIPS(vgg_path)
        else:
            self.perceptual = None
        self.discriminator = NLayerDiscriminator(disc_in_channels, disc_ndf, disc_layers, norm=disc_norm)
        self.register_buffer("ema_real", torch.zeros(()))  # LeCam anchors
        self.register_buffer("ema_fake", torch.zeros(()))

    def gan_active(self, step: int) -> bool:
        return self.disc_factor > 0 and step >= self.disc_start

    def reconstruction(self, inputs: torch.Tensor, recon: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Per-sample-mean pixel (+ perceptual) loss, the ``nll`` of taming's naming."""
        diff = (inputs - recon).abs() if self.pixel_loss == "l1" else (inputs - recon) ** 2
        rec = self.pixel_weight * diff.mean()
        logs = {"rec_loss": rec.detach()}
        if self.perceptual is not None:
            p = self.perceptual(inputs.contiguous(), recon.contiguous()).mean()
            logs["perceptual_loss"] = p.detach()
            rec = rec + self.perceptual_weight * p
        return rec, logs

    def generator_loss(self, inputs, recon, qloss, last_layer, step: int) -> tuple[torch.Tensor, dict]:
        nll, logs = self.reconstruction(inputs, recon)
        loss = nll + self.codebook_weight * qloss
        logs.update(nll_loss=nll.detach(), quant_loss=qloss.detach())
        if self.gan_active(step):
            g_loss = generator_adv(self.discriminator(recon.contiguous()), self.disc_loss)
            weight = self.disc_weight
            if self.adaptive and self.training and torch.is_grad_enabled():
                weight = adaptive_weight(nll, g_loss, last_layer) * self.disc_weight
            loss = loss + weight * self.disc_factor * g_loss
            logs.update(g_loss=g_loss.detach(), d_weight=torch.as_tensor(weight).detach())
        logs["total_loss"] = loss.detach()
        return loss, logs

    def discriminator_loss(self, inputs, recon, step: int) -> tuple[torch.Tensor, dict]:
        if not self.gan_active(step):
            zero = inputs.new_zeros(())
            return zero, {"disc_loss": zero}
        real = inputs.detach().requires_grad_(self.r1_weight > 0)
        logits_real = self.discriminator(real.contiguous())
        logits_fake = self.discriminator(recon.detach().contiguous())
        d_loss = (hinge_d if self.disc_loss == "hinge" else vanilla_d)(logits_real, logits_fake)
        loss = self.disc_factor * d_loss
        logs = {"disc_loss": d_loss.detach(), "logits_real": logits_real.mean().detach(),
                "logits_fake": logits_fake.mean().detach()}
        if self.r1_weight > 0:  # gradient penalty on real images
            (grad,) = torch.autograd.grad(logits_real.sum(), real, create_graph=True)
            r1 = grad.pow(2).flatten(1).sum(1).mean()
            loss = loss + 0.5 * self.r1_weight * r1
            logs["r1"] = r1.detach()
        if self.lecam_weight > 0:  # LeCam: keep D's outputs near their moving averages
            with torch.no_grad():
                d = self.lecam_decay
                self.ema_real.mul_(d).add_((1 - d) * logits_real.mean())
                self.ema_fake.mul_(d).add_((1 - d) * logits_fake.mean())
            lecam = F.relu(logits_real - self.ema_fake).pow(2).mean() + F.relu(self.ema_real - logits_fake).pow(2).mean()
            loss = loss + self.lecam_weight * lecam
            logs["lecam"] = lecam.detach()
        return loss, logs
