"""The SPADE / GauGAN objective: multi-scale hinge GAN, discriminator feature matching (weight 10), a
perceptual term (our LPIPS with VGG16 weights from a local file; the paper uses an L1 VGG19 feature loss),
and the style encoder's KL divergence (weight 0.05).

Every term is a mean over the batch, so DDP's average of per-rank losses is the global batch's loss (the
reference's KL sums over each GPU's samples; here it is summed over the latent dimensions and averaged over
samples, which with batch ``B`` equals the reference's value divided by ``B``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from t2i.models.spade import MultiscaleDiscriminator


def hinge_d(logits_real: list[torch.Tensor], logits_fake: list[torch.Tensor]) -> torch.Tensor:
    """Discriminator hinge loss averaged over scales: ``mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))``."""
    real = sum(F.relu(1.0 - r).mean() for r in logits_real) / len(logits_real)
    fake = sum(F.relu(1.0 + f).mean() for f in logits_fake) / len(logits_fake)
    return real + fake


def hinge_g(logits_fake: list[torch.Tensor]) -> torch.Tensor:
    """Generator's hinge term averaged over scales: ``-mean(D(fake))``."""
    return sum(-f.mean() for f in logits_fake) / len(logits_fake)


def feature_matching(feats_fake: list[list[torch.Tensor]], feats_real: list[list[torch.Tensor]],
                     weight: float = 10.0) -> torch.Tensor:
    """``weight / num_d * sum over scales and intermediate layers of mean |F_fake - F_real|`` (the logits,
    each scale's last entry, are not matched; real features carry no gradient)."""
    total = 0.0
    for fake, real in zip(feats_fake, feats_real):
        for f, r in zip(fake[:-1], real[:-1]):
            total = total + F.l1_loss(f, r.detach())
    return total * weight / len(feats_fake)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``KL(N(mu, exp(logvar)) || N(0, I))`` summed over the latent dimensions, averaged over the batch."""
    return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).sum(1).mean()


class SPADELoss(nn.Module):
    """Holds the multi-scale discriminator and the frozen LPIPS network; ``generator_loss`` and
    ``discriminator_loss`` take the network input map (``seg``), real and generated images."""

    def __init__(self, input_nc: int, disc_ndf: int = 64, disc_layers: int = 3, num_d: int = 2,
                 disc_norm: str = "instance", spectral: bool = True, gan_weight: float = 1.0,
                 feat_weight: float = 10.0, perceptual_weight: float = 1.0, vgg_path: str | None = None,
                 kl_weight: float = 0.05, l1_weight: float = 0.0):
        super().__init__()
        self.gan_weight, self.feat_weight, self.kl_weight = gan_weight, feat_weight, kl_weight
        self.perceptual_weight, self.l1_weight = perceptual_weight, l1_weight
        self.vgg_path = vgg_path
        self.discriminator = MultiscaleDiscriminator(input_nc + 3, disc_ndf, disc_layers, num_d, disc_norm, spectral)
        self._perceptual: list[nn.Module] = []  # frozen LPIPS, built on first use; not a submodule, so
        # checkpoints hold no VGG weights and a rebuild for generation needs no VGG file

    def check_perceptual(self) -> None:
        """With ``perceptual_weight > 0``: the clear missing-file error of :func:`t2i.losses.perceptual.find_vgg16`."""
        if self.perceptual_weight > 0:
            from t2i.losses.perceptual import find_vgg16

            find_vgg16(self.vgg_path)

    @property
    def perceptual(self) -> nn.Module | None:
        if self.perceptual_weight <= 0:
            return None
        if not self._perceptual:
            from t2i.losses.perceptual import LPIPS

            self._perceptual.append(LPIPS(self.vgg_path))
        return self._perceptual[0]

    def _discriminate(self, seg, fake, real):
        """One discriminator pass over ``[fake; real]`` (as the reference: batch statistics see both)."""
        feats = self.discriminator(torch.cat([torch.cat([seg, fake], 1), torch.cat([seg, real], 1)], 0))
        n = fake.shape[0]
        return [[f[:n] for f in scale] for scale in feats], [[f[n:] for f in scale] for scale in feats]

    def generator_loss(self, seg, real, fake, mu=None, logvar=None) -> tuple[torch.Tensor, dict]:
        feats_fake, feats_real = self._discriminate(seg, fake, real)
        g = hinge_g([s[-1] for s in feats_fake])
        loss = self.gan_weight * g
        logs = {"g_loss": g.detach()}
        if self.feat_weight > 0:
            fm = feature_matching(feats_fake, feats_real, self.feat_weight)
            loss = loss + fm
            logs["feat_loss"] = fm.detach()
        if self.perceptual is not None:
            p = self.perceptual.to(fake.device)(real.contiguous(), fake.contiguous()).mean()
            loss = loss + self.perceptual_weight * p
            logs["perceptual_loss"] = p.detach()
        if self.l1_weight > 0:
            l1 = (fake - real).abs().mean()
            loss = loss + self.l1_weight * l1
            logs["l1_loss"] = l1.detach()
        if mu is not None:
            kl = kl_divergence(mu, logvar)
            loss = loss + self.kl_weight * kl
            logs["kl"] = kl.detach()
        logs["total_loss"] = loss.detach()
        return loss, logs

    def discriminator_loss(self, seg, real, fake) -> tuple[torch.Tensor, dict]:
        feats_fake, feats_real = self._discriminate(seg, fake.detach(), real)
        lf, lr = [s[-1] for s in feats_fake], [s[-1] for s in feats_real]
        d = hinge_d(lr, lf)
        return d, {"disc_loss": d.detach(), "logits_real": sum(x.mean() for x in lr).detach() / len(lr),
                   "logits_fake": sum(x.mean() for x in lf).detach() / len(lf)}
