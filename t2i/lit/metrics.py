"""Reconstruction metrics shared by the image-tokenizer modules."""

from __future__ import annotations

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


def image_metrics(inputs: torch.Tensor, recon: torch.Tensor) -> dict[str, torch.Tensor]:
    """PSNR (dB, over the batch) and SSIM on [0, 1] images; inputs and reconstructions in [-1, 1].
    SSIM's 11x11 Gaussian window shrinks for images smaller than 11 px."""
    x, y = (inputs.float() + 1) / 2, (recon.float().clamp(-1, 1) + 1) / 2
    size = min(x.shape[-2:])
    kernel = min(11, size if size % 2 else size - 1)
    return {"psnr": peak_signal_noise_ratio(y, x, data_range=1.0),
            "ssim": structural_similarity_index_measure(y, x, data_range=1.0, kernel_size=kernel,
                                                        sigma=1.5 * kernel / 11)}
