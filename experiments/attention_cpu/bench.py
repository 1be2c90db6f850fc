"""CPU attention: PyTorch's ``scaled_dot_product_attention`` vs our explicit ``math_attention``.

On CPU, ``scaled_dot_product_attention`` dispatches to a flash-attention kernel whose bfloat16 backward is
slow for short sequences; the explicit form (bf16 matmuls, float32 softmax; ``attn_impl=math``) is faster
there and slower for long ones. This measures both, forward+backward and forward only, over sequence
lengths, then whole training steps of the Shapes demo's transformer and CLIP (AdamW, bf16 autocast or
fp32), so a config can pick by numbers.

    python experiments/attention_cpu/bench.py --out experiments/attention_cpu/RESULTS.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from t2i.lit.clip import ContrastiveLoss
from t2i.models.attention import math_attention
from t2i.models.clip import CLIP
from t2i.models.transformer import Transformer

CASES = [  # (sequence length, batch, heads): Shapes CLIP ViT, Shapes transformer, 16x16 grid, 32x32 grid
    (65, 128, 4), (88, 32, 4), (320, 16, 8), (1088, 4, 8)]


def timed(fn, warmup: int, reps: int) -> float:
    """Median milliseconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def attention_rows(reps: int) -> list[str]:
    rows = []
    for L, B, H in CASES:
        mask = torch.ones(L, L, dtype=torch.bool).tril()
        for dtype in (torch.bfloat16, torch.float32):
            for grad in (True, False):
                q, k, v = (torch.randn(B, H, L, 64, dtype=dtype, requires_grad=grad) for _ in range(3))

                def call(f, q=q, k=k, v=v, mask=mask, grad=grad):
                    def run():
                        with torch.set_grad_enabled(grad):
                            y = f(q, k, v, mask)
                            if grad:
                                y.float().sum().backward()
                    return run

                sdpa = timed(call(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m)), 2, reps)
                math = timed(call(math_attention), 2, reps)
                rows.append(f"| {L} | {B} | {H} | {str(dtype)[6:]} | {'fwd+bwd' if grad else 'fwd'} | {sdpa:.1f} | "
                            f"{math:.1f} | **{sdpa / math:.2f}x** |")
    return rows


def transformer_step(impl: str, bf16: bool):
    torch.manual_seed(0)
    m = Transformer(text_vocab=41, text_len=24, image_vocab=128, image_grid=(8, 8), n_layer=4, n_head=4,
                    d_model=256, attention="full", attn_impl=impl)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    text, image = torch.randint(1, 41, (32, 24)), torch.randint(0, 128, (32, 64))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            t, i = m.loss(text, image)
        ((t + 7 * i) / 8).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def clip_step(impl: str, bf16: bool):
    torch.manual_seed(0)
    m = CLIP(vocab_size=65, text_len=24, image_size=32, embed_dim=128, patch_size=4, vision_width=128,
             vision_layers=3, vision_heads=4, text_width=128, text_layers=3, text_heads=4, attn_impl=impl)
    loss, opt = ContrastiveLoss(False), torch.optim.AdamW(m.parameters(), lr=1e-3)
    images, ids = torch.rand(128, 3, 32, 32) * 2 - 1, torch.randint(1, 65, (128, 24))
    ids[:, 16:] = 0

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = loss(m.encode_image(images), m.encode_text(ids), m.scale())
        out.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def step_rows(reps: int) -> list[str]:
    rows = []
    for name, build in (("Shapes transformer (4 x 256, 88 tokens, batch 32)", transformer_step),
                        ("Shapes CLIP (ViT 3 x 128 + text 3 x 128, batch 128)", clip_step)):
        base = timed(build("sdpa", False), 3, reps)
        for impl, bf16 in (("sdpa", False), ("sdpa", True), ("math", False), ("math", True)):
            ms = base if (impl, bf16) == ("sdpa", False) else timed(build(impl, bf16), 3, reps)
            rows.append(f"| {name} | {'bf16-mixed' if bf16 else '32-true'} | {impl} | {ms:.0f} | "
                        f"**{base / ms:.2f}x** |")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the markdown table here")
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    load = os.getloadavg()[0]
    attn = attention_rows(args.reps)
    steps = step_rows(args.reps)
    lines = [
        "# CPU attention: `scaled_dot_product_attention` vs explicit `math_attention`", "",
        "Command: `python experiments/attention_cpu/bench.py --out experiments/attention_cpu/RESULTS.md`", "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, Python {platform.python_version()}; "
        f"1-minute load average at start / end: {load:.1f} / {os.getloadavg()[0]:.1f}. Medians of {args.reps} calls.",
        "", "## One attention call (causal mask, head dim 64)", "",
        "| length | batch | heads | dtype | pass | sdpa ms | math ms | math speed-up |", "|---|---|---|---|---|---|---|---|",
        *attn, "", "## Whole training steps (forward, backward, AdamW)", "",
        "| model | precision | attn_impl | ms/step | speed vs fp32 sdpa |", "|---|---|---|---|---|", *steps, "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    sys.exit(main())
