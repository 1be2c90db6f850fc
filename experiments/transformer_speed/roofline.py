"""Cached decode steps against the memory roofline of this machine, before / after, in one run.

    python experiments/transformer_speed/roofline.py                 # writes RESULTS_roofline.{md,json}
    python experiments/transformer_speed/roofline.py --quick         # Shapes geometry only, one round

A decode step (one image token for every row of the batch) must read every weight it multiplies with
(the blocks, the final LayerNorm and the image head; not the embedding tables, of which it reads one row,
nor the text head) and the keys and values of every earlier position in every layer. At a few rows that
is all it does, so its floor is ``bytes / read bandwidth``; the table reports that floor, the measured
step, their ratio (``x roofline``: 1.0 is the floor) and image tokens per second.

- Read bandwidth: the best of a ``sum`` and a matrix-vector product over a 1 GiB float32 tensor (far
  larger than the 300 MiB L3 of this CPU), median of ``--repeats``; a copy is reported beside it.
- Matmul peak (float32 and bfloat16): a 2048^3 ``mm``, for the compute floor ``FLOPs / peak`` that binds
  large batches in float32 (the table shows it where it is above the memory floor).
- Step: the model is built from :class:`t2i.models.transformer.Transformer` with a fixed seed, its KV
  cache filled with random keys and values up to the middle of the image (so the timed steps read the
  mean length of a whole image: ``text_len + n_image / 2`` positions), and ``decode_step`` is timed
  over 10 consecutive positions after 3 warm-up steps (median). ``before`` is the package of git
  revision ``--baseline`` (extracted with ``git archive`` into a temporary folder), ``after`` the work
  tree; each runs in its own process, alternating, for ``--rounds`` rounds, and the median round is kept.
- From outside: ``t2i.sampling.generate`` on one caption x 8 samples, top-k 256, primed with all but the
  last 64 image codes, minus the same call's prefill (timed alone), over 64 steps; its floor uses the KV
  length of those 64 positions. Same seed before and after: the codes must be equal (float32).

Threads: ``torch.set_num_threads(--threads)`` in every process (2: all this machine has).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
GEOMETRIES = {
    # muge_transformer with bert-base-chinese's vocabulary (21,128 words)
    "muge": dict(text_vocab=21128, text_len=32, image_vocab=16384, image_grid=(16, 16), n_layer=12, n_head=12,
                 d_model=768, attention="dalle", conv_kernel=11),
    # shapes_transformer over shapes_vqgan's 8x8 grid of 128 codes and the Shapes tokenizer's 1,000 words
    "shapes": dict(text_vocab=1000, text_len=18, image_vocab=128, image_grid=(8, 8), n_layer=4, n_head=4,
                   d_model=256, attention="full", conv_kernel=5),
}
DTYPES = ("float32", "bfloat16")
BATCHES = (1, 8, 32)
BASELINE = "803cda5"  # the last commit before the decode-step work (issue 29)


# -- worker (one process per implementation x geometry x dtype) ----------------------------------------
def median_time(fn, n: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def build(geom: str, dtype):
    import torch

    from t2i.models.transformer import Transformer

    torch.manual_seed(0)
    return Transformer(**GEOMETRIES[geom]).eval().to(dtype)


def step_bytes(model, batch: int, kv_len: float, elsize: int) -> float:
    read = [model.blocks, model.ln_f] + ([model.logits_ln] if model.logits_ln is not None else []) + [model.image_head]
    weights = sum(p.numel() for m in read for p in m.parameters()) * elsize
    kv = 2 * model.n_layer * batch * model.n_head * model.head_dim * kv_len * elsize
    return weights + kv


def step_flops(model, batch: int, kv_len: float) -> float:
    read = [model.blocks, model.image_head]
    mat = sum(p.numel() for m in read for p in m.parameters() if p.dim() == 2)
    return 2 * batch * mat + 4 * model.n_layer * batch * model.n_head * model.head_dim * kv_len


def worker(geom: str, dtype_name: str, batches, steps: int) -> dict:
    import torch

    dtype = getattr(torch, dtype_name)
    model = build(geom, dtype)
    out = {}
    with torch.no_grad():
        for batch in batches:
            first = model.n_image // 2 - steps // 2 - 3  # timed steps straddle the middle of the image
            cache = model.new_cache(batch, "cpu", dtype)
            for k, v in zip(cache.k, cache.v):
                k.normal_()
                v.normal_()
            code = torch.randint(0, model.image_vocab, (batch,))
            i = iter(range(first, model.n_image))
            sec = median_time(lambda code=code, i=i, cache=cache: model.decode_step(code, next(i), cache), steps)
            # the timed steps feed codes first+3 .. first+3+steps-1; step j reads text_len + j + 1 positions
            kv_len = model.text_len + first + 3 + (steps - 1) / 2 + 1
            out[batch] = dict(step_s=sec, kv_len=kv_len, bytes=step_bytes(model, batch, kv_len, dtype.itemsize),
                              flops=step_flops(model, batch, kv_len))
            del cache
    return out


def outside_worker(dtype_name: str, tail: int = 64, batch: int = 8) -> dict:
    """``generate`` on the muge geometry, one caption x ``batch``, primed so that ``tail`` codes are drawn."""
    import torch

    from t2i.sampling import generate

    dtype = getattr(torch, dtype_name)
    model = build("muge", dtype)
    g = torch.Generator().manual_seed(0)
    text = torch.randint(1, model.text_vocab, (1, model.text_len), generator=g)
    prime = torch.randint(0, model.image_vocab, (1, model.n_image - tail), generator=g)
    rep = prime.repeat_interleave(batch, 0)

    def prefill():
        with torch.no_grad():
            model.prefill(text.repeat_interleave(batch, 0), model.new_cache(batch, "cpu", dtype), rep)

    def sample():
        return generate(model, text, batch, top_k=256, prime=prime, generator=torch.Generator().manual_seed(1))

    pre = median_time(prefill, 3, warmup=1)
    t0 = time.perf_counter()
    codes = sample()
    total = time.perf_counter() - t0
    t0 = time.perf_counter()
    codes2 = sample()
    total = min(total, time.perf_counter() - t0)
    assert torch.equal(codes, codes2)
    kv_len = model.text_len + model.n_image - tail + (tail - 1) / 2  # steps feed codes n-tail .. n-2
    return dict(step_s=(total - pre) / (tail - 1), prefill_s=pre, generate_s=total, kv_len=kv_len,
                bytes=step_bytes(model, batch, kv_len, dtype.itemsize), codes=codes.flatten().tolist())


# -- the machine ------------------------------------------------------------------------------------
def bandwidth(repeats: int) -> dict:
    import torch

    big = torch.randn(256 * 1024 * 1024)  # 1 GiB float32
    mat, ones = big.view(-1, 4096), torch.ones(4096)
    dst = torch.empty_like(big)
    nbytes = big.numel() * 4
    out = {"sum_GBps": nbytes / median_time(big.sum, repeats, 1) / 1e9,
           "mv_GBps": nbytes / median_time(lambda: torch.mv(mat, ones), repeats, 1) / 1e9,
           "copy_rw_GBps": 2 * nbytes / median_time(lambda: dst.copy_(big), repeats, 1) / 1e9}
    out["read_GBps"] = max(out["sum_GBps"], out["mv_GBps"])
    return out


def matmul_peak(repeats: int) -> dict:
    import torch

    out = {}
    for name in DTYPES:
        a = torch.randn(2048, 2048).to(getattr(torch, name))
        out[f"{name}_GFLOPs"] = 2 * 2048**3 / median_time(lambda a=a: a @ a, repeats, 2) / 1e9
    return out


# -- driver -----------------------------------------------------------------------------------------
def run_worker(args, pythonpath: str, task: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=pythonpath, OMP_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, __file__, "--worker", json.dumps(task), "--threads", str(args.threads)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=HERE)
    if res.returncode:
        raise SystemExit(f"worker {task} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def extract(rev: str, into: Path) -> str:
    archive = subprocess.run(["git", "archive", rev, "t2i"], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return str(into)


def load_avg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--baseline", default=BASELINE)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-outside", action="store_true")
    ap.add_argument("--out", default=str(HERE / "RESULTS_roofline"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.worker:
        task = json.loads(args.worker)
        res = outside_worker(task["dtype"]) if task.get("outside") else \
            worker(task["geom"], task["dtype"], task["batches"], task["steps"])
        print(json.dumps(res))
        return

    geoms = ["shapes"] if args.quick else list(GEOMETRIES)
    rounds = 1 if args.quick else args.rounds
    loads = [load_avg()]
    machine = {"bandwidth": bandwidth(args.repeats), "matmul_peak": matmul_peak(args.repeats)}
    print(json.dumps(machine), flush=True)
    tmp = tempfile.TemporaryDirectory()
    impls = {"before": extract(args.baseline, Path(tmp.name)), "after": str(ROOT)}
    runs: dict = {}
    for r in range(rounds):
        for geom in geoms:
            for dtype in DTYPES:
                for impl, path in impls.items():
                    res = run_worker(args, path, dict(geom=geom, dtype=dtype, batches=BATCHES, steps=args.steps))
                    runs.setdefault(f"{geom}/{dtype}/{impl}", []).append(res)
                    loads.append(load_avg())
                    print(r, geom, dtype, impl, {b: round(v["step_s"] * 1e3, 2) for b, v in res.items()},
                          f"load {loads[-1]}", flush=True)
    outside = {}
    if not args.quick and not args.no_outside:
        for dtype in DTYPES:
            for impl, path in impls.items():
                outside[f"{dtype}/{impl}"] = run_worker(args, path, dict(outside=True, dtype=dtype))
                loads.append(load_avg())
                print("outside", dtype, impl, round(outside[f"{dtype}/{impl}"]["step_s"] * 1e3, 2), flush=True)
    loads.append(load_avg())
    write(args, machine, runs, outside, loads)


def pick(rounds: list[dict]) -> dict:
    """Per batch, the round with the median step time."""
    out = {}
    for b in rounds[0]:
        ordered = sorted((r[b] for r in rounds), key=lambda v: v["step_s"])
        out[b] = ordered[len(ordered) // 2]
    return out


def write(args, machine, runs, outside, loads):
    import torch

    bw = machine["bandwidth"]["read_GBps"] * 1e9
    rows, data = [], {"machine": machine, "threads": args.threads, "baseline": args.baseline,
                      "torch": torch.__version__, "load_average": loads, "steps": {}, "outside": {}}
    for key in sorted({k.rsplit("/", 1)[0] for k in runs}, key=lambda k: (k.split("/")[0] != "muge", k)):
        before, after = pick(runs[f"{key}/before"]), pick(runs[f"{key}/after"])
        geom, dtype = key.split("/")
        peak = machine["matmul_peak"][f"{dtype}_GFLOPs"] * 1e9
        for b in before:
            a, o = after[b], before[b]
            b = int(b)
            floor = a["bytes"] / bw
            compute = a["flops"] / peak
            data["steps"][f"{key}/{b}"] = dict(before=o, after=a, roofline_s=floor, compute_floor_s=compute)
            rows.append(f"| {geom} | {dtype} | {b} | {a['bytes'] / 1e6:.0f} | {floor * 1e3:.2f} | "
                        f"{o['step_s'] * 1e3:.2f} | {a['step_s'] * 1e3:.2f} | {o['step_s'] / floor:.2f}x | "
                        f"**{a['step_s'] / floor:.2f}x** | {a['bytes'] / a['step_s'] / 1e9:.1f} | "
                        f"{b / o['step_s']:.0f} / {b / a['step_s']:.0f} | "
                        f"{o['step_s'] / a['step_s']:.2f}x |" + (f" {compute * 1e3:.1f}" if compute > floor else " |"))
    out_rows = []
    for dtype in DTYPES:
        if f"{dtype}/after" not in outside:
            continue
        o, a = outside[f"{dtype}/before"], outside[f"{dtype}/after"]
        floor = a["bytes"] / bw
        same = o["codes"] == a["codes"]
        data["outside"][dtype] = dict(before={k: v for k, v in o.items() if k != "codes"},
                                      after={k: v for k, v in a.items() if k != "codes"}, roofline_s=floor,
                                      same_codes=same)
        out_rows.append(f"| {dtype} | {a['bytes'] / 1e6:.0f} | {floor * 1e3:.2f} | {o['step_s'] * 1e3:.2f} | "
                        f"{a['step_s'] * 1e3:.2f} | {o['step_s'] / floor:.2f}x | **{a['step_s'] / floor:.2f}x** | "
                        f"{8 / a['step_s']:.0f} | {'yes' if same else 'no'} |")
    m = machine
    text = [
        "# Cached decode against the memory roofline",
        "",
        f"Command: `python experiments/transformer_speed/roofline.py{' --quick' if args.quick else ''}` "
        f"(method in its docstring). Machine: {platform.machine()}, {os.cpu_count()} logical CPUs "
        f"(shared with other jobs), `torch.set_num_threads({args.threads})`, torch {torch.__version__}; "
        f"load average (1 min) during the run {min(loads):.2f} - {max(loads):.2f} "
        f"(median {statistics.median(loads):.2f}). Before: git `{args.baseline}`; after: this tree.",
        "",
        f"Read bandwidth (1 GiB float32): sum {m['bandwidth']['sum_GBps']:.1f} GB/s, matrix-vector "
        f"{m['bandwidth']['mv_GBps']:.1f} GB/s -> roofline **{m['bandwidth']['read_GBps']:.1f} GB/s**; copy "
        f"{m['bandwidth']['copy_rw_GBps']:.1f} GB/s read + write. Matmul peak (2048^3): float32 "
        f"{m['matmul_peak']['float32_GFLOPs']:.0f} GFLOP/s, bfloat16 {m['matmul_peak']['bfloat16_GFLOPs']:.0f} GFLOP/s.",
        "",
        "## One cached decode step at the mean KV length",
        "",
        "| geometry | dtype | batch | bytes/step MB | roofline ms | before ms | after ms | before x roofline | "
        "after x roofline | after GB/s | image tokens/s before / after | speed-up | compute floor ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]
    if out_rows:
        text += ["", "## From outside: `t2i.sampling.generate`, muge geometry, 1 caption x 8, top-k 256, 64 steps",
                 "", "| dtype | bytes/step MB | roofline ms | before ms/step | after ms/step | before x roofline | "
                 "after x roofline | image tokens/s after | same codes before / after |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|---:|", *out_rows]
    Path(args.out + ".md").write_text("\n".join(text) + "\n")
    Path(args.out + ".json").write_text(json.dumps(data, indent=1) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
