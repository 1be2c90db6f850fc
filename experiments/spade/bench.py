"""SPADE training-step speed and MFU on this machine (no runnable NVIDIA SPADE on PyPI to compare with: `pip
download gaugan` is a client for NVIDIA's web demo, `spade` an agent framework).

One step = the module's generator (+ encoder) step and discriminator step (forward, backward, fused Adam),
timed after warm-up; FLOPs from torch.utils.flop_counter (convolutions and matmuls, forward + backward); MFU =
achieved FLOP/s over the larger of this machine's measured dense matmul and 3x3-convolution peaks at the same
thread count. The load average is printed: the machine is shared.

    python experiments/spade/bench.py [--threads 1] [--sizes shapes,ade20k_b1]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from t2i.lit.spade import SPADEModule

SIZES = {  # name: (module kwargs, batch)
    "shapes": (dict(model=dict(num_classes=25, image_size=32, ngf=8, latent_size=4, use_vae=True, z_dim=16, nef=8,
                               hidden=32, norm="batch"),
                    loss=dict(disc_ndf=16, disc_layers=2, num_d=2, perceptual_weight=0.0, l1_weight=10.0)), 16),
    # the paper's ADE20K generator / discriminator (ngf 64, 151 classes, 256 px, 5 stages), one image
    "ade20k_b1": (dict(model=dict(num_classes=151, image_size=256, ngf=64, latent_size=8, norm="batch"),
                       loss=dict(disc_ndf=64, disc_layers=3, num_d=2, perceptual_weight=0.0)), 1),
}


def matmul_peak(seconds: float = 3.0) -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return n * 2 * 2048**3 / (time.perf_counter() - t0)


def conv_peak(seconds: float = 3.0) -> float:
    x, w = torch.randn(8, 128, 32, 32), torch.randn(128, 128, 3, 3)
    F.conv2d(x, w, padding=1)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        F.conv2d(x, w, padding=1)
        n += 1
    return n * 2 * 8 * 128 * 128 * 9 * 32 * 32 / (time.perf_counter() - t0)


def step_fn(module: SPADEModule, batch: int):
    torch.manual_seed(0)
    h, w = module.generator.size
    label = torch.randint(0, module.num_classes, (batch, h, w))
    real = torch.rand(batch, 3, h, w) * 2 - 1
    seg = module.seg_input(label)
    gen = list(module.generator.parameters()) + (list(module.encoder.parameters()) if module.encoder else [])
    opt_g = torch.optim.Adam(gen, lr=1e-4, betas=(0.0, 0.9), fused=True)
    opt_d = torch.optim.Adam(module.loss.discriminator.parameters(), lr=4e-4, betas=(0.0, 0.9), fused=True)

    def step():
        z = mu = logvar = None
        if module.encoder is not None:
            z, mu, logvar = module.style(real)
        fake = module.generator(seg, z)
        g, _ = module.loss.generator_loss(seg, real, fake, mu, logvar)
        opt_g.zero_grad(set_to_none=True)
        g.backward()
        opt_g.step()
        d, _ = module.loss.discriminator_loss(seg, real, fake.detach())
        opt_d.zero_grad(set_to_none=True)
        d.backward()
        opt_d.step()

    return step


def measure(name: str, steps: int) -> dict:
    kwargs, batch = SIZES[name]
    module = SPADEModule(**kwargs).train()
    step = step_fn(module, batch)
    step()  # warm-up
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sec = (time.perf_counter() - t0) / steps
    params = {k: sum(p.numel() for p in getattr(module, k).parameters()) for k in ("generator", "encoder")
              if getattr(module, k) is not None}
    params["discriminator"] = sum(p.numel() for p in module.loss.discriminator.parameters())
    return {"size": name, "batch": batch, "params": params, "gflop_per_step": flops / 1e9, "s_per_step": sec,
            "images_per_s": batch / sec, "gflops": flops / sec / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sizes", default="shapes,ade20k_b1")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    load = os.getloadavg()[0]
    peak = max(matmul_peak(), conv_peak())
    rows = [measure(s, args.steps if s == "shapes" else 2) for s in args.sizes.split(",")]
    for r in rows:
        r["mfu"] = r["gflops"] * 1e9 / peak
    print(json.dumps({"threads": args.threads, "load_avg_1min": load, "peak_gflops": peak / 1e9,
                      "matmul_gflops": matmul_peak(1.0) / 1e9, "conv_gflops": conv_peak(1.0) / 1e9,
                      "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
