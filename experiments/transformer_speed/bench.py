"""Stage-2 transformer speed: ours vs lucidrains/DALLE-pytorch at the same size, same machine, same run.

    python experiments/transformer_speed/bench.py            # writes RESULTS.md next to this file
    python experiments/transformer_speed/bench.py --quick    # smaller, for a smoke run

Size (both models): 12 layers, width 512, 8 heads of 64, text 32, image 16x16 = 256 tokens, batch 8,
text vocabulary 10,000, image codebook 8,192. Schedules: ``dalle`` (ours: row / column / conv per
layer; DALLE-pytorch: axial_row / axial_col / conv_like at the same layers) and ``full``.

- Sampling: image tokens per second over a whole 256-token image (top-k, temperature 1, no guidance),
  the image tokenizer's decode excluded on both sides. DALLE-pytorch with ``use_cache=True`` is timed
  over its full ``generate_images`` loop; without the cache (its default) one image takes minutes, so
  its per-step cost (a forward pass over the sequence so far plus sampling) is timed at 5 prefix
  lengths and integrated over the 256 steps (trapezoid rule). Ours is timed over whole images.
- Training: tokens per second of forward + backward + AdamW step, and the peak resident memory the
  steps add (Linux ``VmHWM`` reset through ``/proc/self/clear_refs``), each model in a fresh process.
- MFU: model FLOPs per second against this machine's measured float32 matmul peak.

dalle-pytorch is not a dependency of t2i: ``pip install --no-deps dalle-pytorch axial-positional-embedding
rotary-embedding-torch ftfy`` (its import needs taming-transformers-rom1504, already in the lock). Its
imports of ``pkg_resources``, ``youtokentome``, ``transformers`` and
``pytorch_lightning.utilities.distributed`` are aliased here, in the script only.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SIZE = dict(n_layer=12, d_model=512, n_head=8, text_len=32, grid=16, batch=8, text_vocab=10000, image_vocab=8192)
QUICK = dict(n_layer=4, d_model=256, n_head=4, text_len=16, grid=8, batch=4, text_vocab=1000, image_vocab=1024)
PEER_PATTERN = {"row": "axial_row", "column": "axial_col", "conv": "conv_like", "full": "full"}


# -- peer import ----------------------------------------------------------------------------------
def import_dalle_pytorch():
    from importlib.metadata import version

    import pytorch_lightning.utilities.rank_zero as rank_zero

    sys.modules.setdefault("pytorch_lightning.utilities.distributed", rank_zero)
    pr = types.ModuleType("pkg_resources")
    pr.get_distribution = lambda name: types.SimpleNamespace(version=version(name))
    sys.modules.setdefault("pkg_resources", pr)
    for name in ("youtokentome", "transformers"):
        try:
            __import__(name)
        except ImportError:
            stub = types.ModuleType(name)
            stub.AutoTokenizer = None
            sys.modules[name] = stub
    import dalle_pytorch

    return dalle_pytorch


# -- models ---------------------------------------------------------------------------------------
def ours(size: dict, schedule: str):
    from t2i.models.transformer import Transformer

    return Transformer(text_vocab=size["text_vocab"], text_len=size["text_len"], image_vocab=size["image_vocab"],
                       image_grid=(size["grid"], size["grid"]), n_layer=size["n_layer"], n_head=size["n_head"],
                       d_model=size["d_model"], d_ff=size.get("d_ff"), attention=schedule, conv_kernel=11)


def peer(size: dict, schedule: str):
    dp = import_dalle_pytorch()
    from t2i.models.attention import layer_patterns

    layers = 2  # DiscreteVAE: image_size / 2**num_layers = grid
    vae = dp.DiscreteVAE(image_size=size["grid"] * 2**layers, num_layers=layers, num_tokens=size["image_vocab"],
                         codebook_dim=64, hidden_dim=16)
    types_ = tuple(PEER_PATTERN[p] for p in layer_patterns(schedule, size["n_layer"]))
    model = dp.DALLE(dim=size["d_model"], vae=vae, num_text_tokens=size["text_vocab"], text_seq_len=size["text_len"],
                     depth=size["n_layer"], heads=size["n_head"], dim_head=size["d_model"] // size["n_head"],
                     attn_types=types_)
    model.vae.decode = lambda seq: seq  # time token generation only (ours excludes decoding too)
    return model


def batch(size: dict, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, size["text_vocab"], (size["batch"], size["text_len"]), generator=g)
    image = torch.randint(0, size["image_vocab"], (size["batch"], size["grid"] ** 2), generator=g)
    return text, image


def n_params(model) -> int:
    """Parameters of the transformer blocks (embeddings and heads excluded: their FLOPs are counted apart)."""
    return sum(p.numel() for n, p in model.named_parameters() if "emb" not in n and "head" not in n
               and "logits" not in n and "vae" not in n and "pos" not in n)


def flops_per_token(size: dict, train: bool) -> float:
    """Dense-model FLOPs per token (2 per multiply-add): block matmuls + the image head + attention over
    the full causal context (an upper bound for the sparse schedules, which compute it on CPU anyway)."""
    d, L, seq = size["d_model"], size["n_layer"], size["text_len"] + size["grid"] ** 2
    d_ff = size.get("d_ff") or 4 * d
    matmul = L * (4 * d * d + 2 * d * d_ff) + d * size["image_vocab"]
    attn = L * 2 * d * seq  # QK^T and AV over seq/2 keys on average, x2 FLOPs per MAC
    return (3 if train else 1) * 2 * (matmul + attn)


def matmul_peak(seconds: float = 3.0) -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return n * 2 * 2048**3 / (time.perf_counter() - t0)


# -- measurements (each in its own process) -------------------------------------------------------
def sample_ours(size, schedule, use_cache=True):
    from t2i.sampling import generate

    torch.manual_seed(0)
    model = ours(size, schedule).eval()
    text, _ = batch(size)
    generate(model, text[:1], 1, top_k=64, use_cache=use_cache)  # warm-up
    t0 = time.perf_counter()
    generate(model, text, 1, top_k=64, use_cache=use_cache, generator=torch.Generator().manual_seed(0))
    seconds = time.perf_counter() - t0
    return {"tokens_per_s": size["batch"] * size["grid"] ** 2 / seconds, "seconds": seconds, "method": "whole image"}


@torch.no_grad()
def sample_peer(size, schedule, use_cache):
    torch.manual_seed(0)
    model = peer(size, schedule).eval()
    text, image = batch(size)
    n = size["grid"] ** 2
    if use_cache:
        model.generate_images(text[:1], use_cache=True, filter_thres=1 - 64 / size["image_vocab"])  # warm-up
        t0 = time.perf_counter()
        model.generate_images(text, use_cache=True, filter_thres=1 - 64 / size["image_vocab"])
        seconds = time.perf_counter() - t0
        return {"tokens_per_s": size["batch"] * n / seconds, "seconds": seconds, "method": "whole image"}
    lengths = [0, n // 4, n // 2, 3 * n // 4, n - 1]
    model(text, image[:, :1])  # warm-up
    times = []
    for k in lengths:  # one generate_images step at prefix length k: forward, top-k, gumbel sample
        t0 = time.perf_counter()
        logits = model(text, image[:, :k])[:, -1]
        dp = sys.modules["dalle_pytorch.dalle_pytorch"]
        dp.gumbel_sample(dp.top_k(logits, thres=1 - 64 / size["image_vocab"]), temperature=1.0, dim=-1)
        times.append(time.perf_counter() - t0)
    seconds = sum((lengths[i + 1] - lengths[i]) * (times[i] + times[i + 1]) / 2 for i in range(len(lengths) - 1))
    seconds += times[-1]  # the trapezoid covers steps 0..n-1 as n-1 intervals; add the last step
    return {"tokens_per_s": size["batch"] * n / seconds, "seconds": seconds,
            "method": f"step times at prefix lengths {lengths}: {[round(t, 3) for t in times]} s, integrated"}


def _reset_peak() -> int:
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def train_step(size, schedule, which, steps=3):
    torch.manual_seed(0)
    model = (ours if which == "ours" else peer)(size, schedule).train()
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if "vae" not in n], lr=1e-4)
    text, image = batch(size)

    def step():
        if which == "ours":
            t, i = model.loss(text, image)
            loss = (t + 7 * i) / 8
        else:
            loss = model(text, image, return_loss=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up (allocates the optimizer state)
    base = _reset_peak()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - t0) / steps
    tokens = size["batch"] * (size["text_len"] + size["grid"] ** 2)
    return {"tokens_per_s": tokens / seconds, "step_s": seconds, "peak_mb": (_status("VmHWM") - base) / 2**20,
            "params": n_params(model)}


def child(args) -> None:
    size = QUICK if args.quick else SIZE
    kind, which, schedule, cache = args.child.split(":")
    if kind == "sample":
        fn = sample_ours if which == "ours" else sample_peer
        out = fn(size, schedule, use_cache=cache == "cache")
    elif which == "ours_matched":  # d_ff 6 * d_model: the parameters of DALLE-pytorch's GEGLU blocks
        out = train_step(dict(size, d_ff=6 * size["d_model"]), schedule, "ours")
    else:
        out = train_step(size, schedule, which)
    print("RESULT " + json.dumps(out))


def run_child(spec: str, quick: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", spec] + (["--quick"] if quick else [])
    res = subprocess.run(cmd, capture_output=True, text=True)
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    if res.returncode or not line:
        raise RuntimeError(f"{spec} failed:\n{res.stderr[-3000:]}")
    out = json.loads(line[-1][7:])
    print(spec, out, flush=True)
    return out


SPECS = [f"{kind}:{which}:{schedule}:{mode}" for schedule in ("dalle", "full") for kind, which, mode in (
    ("sample", "ours", "cache"), ("sample", "peer", "cache"), ("sample", "peer", "nocache"),
    ("train", "ours", "-"), ("train", "peer", "-"))] + ["train:ours_matched:full:-"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child")
    ap.add_argument("--only", help="comma-separated specs to re-measure; the others are read from RESULTS.json")
    ap.add_argument("--out", default=str(HERE / "RESULTS.md"))
    args = ap.parse_args()
    if args.child:
        torch.set_flush_denormal(True)
        child(args)
        return
    size = QUICK if args.quick else SIZE
    store = Path(args.out).with_suffix(".json")
    saved = json.loads(store.read_text()) if args.only and store.exists() else {}
    peak = matmul_peak()
    print(f"float32 matmul peak: {peak / 1e9:.1f} GFLOP/s", flush=True)
    todo = args.only.split(",") if args.only else SPECS
    results = saved.get("results", {})
    for spec in SPECS:
        if spec in todo or spec not in results:
            results[spec] = run_child(spec, args.quick)
    store.write_text(json.dumps({"peak": peak, "results": results}, indent=1))
    write(args.out, size, peak, results)


def write(path: str, size: dict, peak: float, r: dict) -> None:
    f_sample = flops_per_token(size, False)
    lines = [
        "# Transformer speed: t2i vs DALLE-pytorch",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, float32, "
        f"CPU. Written by `experiments/transformer_speed/bench.py`{' --quick' if size is QUICK else ''} (method "
        "in its docstring); each number from its own process, nothing else running. `--only` re-measures "
        "some specs and keeps the others from `RESULTS.json` (same machine).",
        f"Size: {size['n_layer']} layers, width {size['d_model']}, {size['n_head']} heads, text {size['text_len']}, "
        f"image {size['grid']}x{size['grid']}, batch {size['batch']}, codebook {size['image_vocab']}.",
        f"Measured float32 matmul peak: {peak / 1e9:.1f} GFLOP/s.",
        "",
        "## Sampling (image tokens/s)",
        "",
        "| schedule | t2i (KV cache) | DALLE-pytorch default (no cache) | DALLE-pytorch `use_cache=True` "
        "| t2i / default | t2i / cached | t2i MFU |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in ("dalle", "full"):
        o, pc, pn = r[f"sample:ours:{s}:cache"], r[f"sample:peer:{s}:cache"], r[f"sample:peer:{s}:nocache"]
        mfu = o["tokens_per_s"] * f_sample / peak
        lines.append(f"| {s} | {o['tokens_per_s']:.1f} | {pn['tokens_per_s']:.2f} | {pc['tokens_per_s']:.2f} | "
                     f"**{o['tokens_per_s'] / pn['tokens_per_s']:.1f}x** | **{o['tokens_per_s'] / pc['tokens_per_s']:.1f}x**"
                     f" | {100 * mfu:.1f}% |")
    lines += ["", "DALLE-pytorch without its cache, " + "; ".join(
        f"{s}: {r[f'sample:peer:{s}:nocache']['method']}" for s in ("dalle", "full")) + ".", "",
        "## Training (forward + backward + AdamW)", "",
        "| schedule | t2i tokens/s | DALLE-pytorch tokens/s | speed ratio | t2i peak MB | DALLE-pytorch peak MB "
        "| memory ratio | t2i MFU |", "|---|---|---|---|---|---|---|---|"]
    rows = [("dalle", "ours", "dalle"), ("full", "ours", "full"),
            ("full, t2i with d_ff = 6 x width (DALLE-pytorch's block parameters)", "ours_matched", "full")]
    for label, which, s in rows:
        o, p = r[f"train:{which}:{s}:-"], r[f"train:peer:{s}:-"]
        sz = dict(size, d_ff=6 * size["d_model"]) if which == "ours_matched" else size
        mfu = o["tokens_per_s"] * flops_per_token(sz, True) / peak
        lines.append(f"| {label} | {o['tokens_per_s']:.0f} | {p['tokens_per_s']:.0f} | "
                     f"**{o['tokens_per_s'] / p['tokens_per_s']:.2f}x** | {o['peak_mb']:.0f} | {p['peak_mb']:.0f} | "
                     f"{o['peak_mb'] / p['peak_mb']:.2f}x | {100 * mfu:.1f}% |")
    lines += ["", f"Block parameters: t2i {r['train:ours:full:-']['params'] / 1e6:.1f} M (GELU MLP, 4 x width), "
              f"{r['train:ours_matched:full:-']['params'] / 1e6:.1f} M with d_ff = 6 x width; DALLE-pytorch "
              f"{r['train:peer:full:-']['params'] / 1e6:.1f} M (GEGLU feed-forward, token shift and rotary "
              "embeddings, its defaults). MFU counts dense attention FLOPs for every schedule.", ""]
    Path(path).write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
