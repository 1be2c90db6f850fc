"""VQGAN decode at 256 px (the MUGE tokenizer's geometry) against this machine's matmul peak, in one run.

    python experiments/tokenizer_speed/decode_bench.py                      # writes RESULTS_decode.{md,json}
    python experiments/tokenizer_speed/decode_bench.py --trained <vqgan .ckpt> --size 64   # + PSNR on Shapes

Speed: a ``VQGAN`` at ``muge_vqgan``'s architecture (f16: 16 x 16 codes over 16,384, ch 128, ch_mult
1-1-2-2-4, two res blocks per level, attention at 16 px), random weights from a fixed seed, decodes a batch of
``--batch`` random code grids (``VQGAN.decode``: what ``t2i-generate`` and ``t2i-eval`` call) in each variant:

- ``float32``: the model as it is (NCHW);
- ``float32 channels_last``: weights and activations in NHWC (oneDNN's preferred convolution layout);
- ``bfloat16``, ``bfloat16 channels_last``: the weights cast to bfloat16 (the output returned as float32);
- ``autocast bfloat16``: float32 weights under ``torch.autocast("cpu", torch.bfloat16)``.

FLOPs per image are counted once with ``torch.utils.flop_counter.FlopCounterMode``; each variant is timed
``--repeats`` times (median, alternating variants), and its GFLOP/s is set against the matmul peak of its
dtype measured in the same run (a 2048^3 ``mm``, median of 5).

Fidelity: every variant's images against the float32 ones on the same codes, as a PSNR (``agreement``, in
dB over the [-1, 1] range, i.e. peak 2). With ``--trained`` (a VQGAN checkpoint, e.g. the Shapes demo's
``outputs/demo/vqgan/checkpoints/best.ckpt``) the reconstruction PSNR of each variant on ``--images`` Shapes
validation pictures at ``--size`` px, and its change from float32 (the bar: within 0.05 dB).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "transformer_speed"))
from roofline import cpu_name, median_time  # noqa: E402

MUGE_VQGAN = dict(ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16], z_channels=256,
                  embed_dim=256, n_embed=16384, resolution=256, quantizer={"kind": "vq", "l2_normalize": True,
                                                                           "codebook_dim": 32})
VARIANTS = ("float32", "float32 channels_last", "bfloat16", "bfloat16 channels_last", "autocast bfloat16")


def matmul_peak() -> dict:
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(2048, 2048).to(dtype)
        out[str(dtype).split(".")[1]] = 2 * 2048 ** 3 / median_time(lambda a=a: a @ a, 5, 2) / 1e9
    return out


def variant(model, name: str):
    """``decode(codes) -> float32 images`` of ``model`` in the variant ``name`` (a copy where it casts)."""
    import copy

    m = copy.deepcopy(model).eval()
    dtype = torch.bfloat16 if name.startswith("bfloat16") else torch.float32
    m = m.to(dtype)
    if "channels_last" in name:
        m = m.to(memory_format=torch.channels_last)

    def decode(codes):
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=name.startswith("autocast")):
            z = m.quantize.embed_codes(codes.long()).to(dtype)
            if "channels_last" in name:
                z = z.contiguous(memory_format=torch.channels_last)
            return m.decoder(m.post_quant_conv(z)).float().clamp(-1.0, 1.0)
    return decode


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float = 2.0) -> float:
    mse = (a.float() - b.float()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(peak * peak / mse)


def trained_psnr(path: str, size: int, n: int) -> dict:
    """Reconstruction PSNR of each variant on ``n`` Shapes validation pictures (peak 2 over [-1, 1])."""
    from t2i.data.shapes import iter_split
    from t2i.pretrained.image_tokenizers import load_tokenizer

    model = load_tokenizer(path).eval()
    images = torch.stack([torch.from_numpy(__import__("numpy").asarray(s.image, dtype="float32")).permute(2, 0, 1)
                          for s in iter_split("val", n, 0, size)]) / 127.5 - 1
    with torch.no_grad():
        codes = model.encode(images)
    return {name: psnr(variant(model, name)(codes), images) for name in VARIANTS}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--trained", default=None)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--out", default=str(HERE / "RESULTS_decode"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from torch.utils.flop_counter import FlopCounterMode

    from t2i.models.vqgan import VQGAN

    torch.manual_seed(0)
    model = VQGAN(**MUGE_VQGAN).eval()
    codes = torch.randint(0, 16384, (args.batch, 16, 16), generator=torch.Generator().manual_seed(1))
    peak = matmul_peak()
    fns = {name: variant(model, name) for name in VARIANTS}
    with FlopCounterMode(display=False) as fc:
        ref = fns["float32"](codes[:1])
    flops = fc.get_total_flops()
    ref = fns["float32"](codes)
    agreement = {name: psnr(fn(codes), ref) for name, fn in fns.items()}
    times = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            times[name].append(median_time(lambda fn=fn: fn(codes), 1, 1))
    peak_after = matmul_peak()
    quality = trained_psnr(args.trained, args.size, args.images) if args.trained else None
    rows, data = [], {"flops_per_image": flops, "matmul_peak_GFLOPs": [peak, peak_after], "batch": args.batch,
                      "variants": {}}
    base = statistics.median(times["float32"])
    for name in VARIANTS:
        s = statistics.median(times[name])
        gflops = flops * args.batch / s / 1e9
        top = max(peak["bfloat16" if "bfloat16" in name else "float32"],
                  peak_after["bfloat16" if "bfloat16" in name else "float32"])
        q = quality[name] if quality else None
        dq = q - quality["float32"] if quality else None
        data["variants"][name] = dict(seconds=s, images_per_s=args.batch / s, GFLOPs=gflops, fraction_of_peak=gflops / top,
                                      agreement_dB=agreement[name], trained_psnr_dB=q, trained_psnr_change_dB=dq)
        rows.append(f"| {name} | {s * 1e3 / args.batch:.0f} | {args.batch / s:.2f} | {gflops:.0f} | {top:.0f} | "
                    f"{gflops / top:.0%} | {base / s:.2f}x | "
                    + (f"{agreement[name]:.1f}" if math.isfinite(agreement[name]) else "identical")
                    + (f" | {q:.3f} | {dq:+.3f} |" if quality else " |"))
    text = [
        "# VQGAN decode at 256 px against the matmul peak",
        "",
        "Command: `python experiments/tokenizer_speed/decode_bench.py"
        + (f" --trained <ckpt> --size {args.size}" if args.trained else "") + "` (method in its docstring). "
        f"Machine: {platform.machine()}, {os.cpu_count()} logical CPUs ({cpu_name()}), {args.threads} threads, torch "
        f"{torch.__version__}. `muge_vqgan` architecture, random weights, batch {args.batch}: "
        f"**{flops / 1e9:.0f} GFLOP per image** (FlopCounterMode). Matmul peak (2048^3, before / after the "
        f"timings): float32 {peak['float32']:.0f} / {peak_after['float32']:.0f} GFLOP/s, bfloat16 "
        f"{peak['bfloat16']:.0f} / {peak_after['bfloat16']:.0f} GFLOP/s (the higher is the bar).",
        "",
        "| variant | ms / image | images/s | GFLOP/s | peak GFLOP/s | of peak | speed-up | agreement with float32 dB"
        + (f" | trained PSNR dB ({args.images} Shapes val, {args.size} px) | change dB |" if quality else " |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if quality else ""),
        *rows,
    ]
    Path(args.out + ".md").write_text("\n".join(text) + "\n")
    Path(args.out + ".json").write_text(json.dumps(data, indent=1) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
