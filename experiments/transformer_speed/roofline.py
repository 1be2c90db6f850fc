"""Cached decode steps against the memory roofline of this machine, before / after, in one run.

    python experiments/transformer_speed/roofline.py                 # writes RESULTS_roofline.{md,json}
    python experiments/transformer_speed/roofline.py --quick         # Shapes geometry only, one round

A decode step (one image token for every row of the batch) must read every weight it multiplies with
(the blocks, the final LayerNorm and the image head; not the embedding tables, of which it reads one row,
nor the text head) and the keys and values of every earlier position in every layer (the issue's measure:
the sparse layers of the dalle schedule read only the keys their mask row allows, about a third of those at
the muge geometry, so this floor is generous by that much of the KV bytes). It must also do two FLOPs per
weight per row (and four per cached key per row). Its roofline is the larger of ``bytes / read bandwidth``
and ``FLOPs / matmul peak``: at one row the first binds, but a 2-core CPU has little compute per byte
(about 3 - 4 FLOP per byte of bandwidth), so from 8 rows on in float32 the second comes close or binds.
The table reports both floors, the measured step, its ratio to the roofline (``x roofline``: 1.0 is the
floor), its ratio to the memory floor alone and image tokens per second.

- Read bandwidth: the best of a ``sum`` and a matrix-vector product over a 1 GiB float32 tensor (far
  larger than the L3 of these CPUs), median of ``--repeats``; a copy is reported beside it. The bandwidth of
  a shared cloud machine drifts by tens of percent from minute to minute, so every worker also probes it
  (``sum``, median of 3) right before each batch it times, and each step's ``x roofline`` is taken
  against that probe; the table gives the median over rounds of those ratios.
- Matmul peak (float32 and bfloat16): a 2048^3 ``mm``, the best of ``--repeats`` at the start and at the end
  of the run, for the compute floor ``FLOPs / peak`` (a peak measured in a slow minute would raise the
  floor and flatter every ratio).
- Overhead floor: the same model at ``d_model = 4 x n_head`` (head size 4: every operation of the step,
  almost none of its bytes), timed the same way in the same worker: what the step's operations cost by
  themselves, a floor no change to the arithmetic can go below.
- Step: the model is built from :class:`t2i.models.transformer.Transformer` with a fixed seed, its KV
  cache filled with random keys and values up to the middle of the image (so the timed steps read the
  mean length of a whole image: ``text_len + n_image / 2`` positions), and ``decode_step`` is timed
  over 10 consecutive positions after 3 warm-up steps (median). ``before`` is the package of git
  revision ``--baseline`` (extracted with ``git archive`` into a temporary folder), ``after`` the work
  tree, ``previous`` the revision ``--previous`` (the last measured state, to show what changed since);
  each runs in its own process, alternating, for ``--rounds`` rounds, and the median round is kept.
- Linears alone: the same step's packed linear layers (:func:`t2i.models.attention.pack_linear`, the
  weights that are most of the bytes) called back to back without the rest of the step, in the work
  tree's process: what the GEMM library streams at this batch, the floor of the step on this machine.
- From outside: ``t2i.sampling.generate`` on one caption x 8 samples, top-k 256, primed with all but the
  last 64 image codes, minus the prefill that call itself ran (its ``model.prefill`` timed in place), over
  the 63 decode steps and 64 draws, in a process that has made a cache before (every call but a process's
  first: the packed weights are kept with the model; a first and a second ``new_cache`` are timed apart);
  its floor uses the KV length of those 64 positions. Same seed before and after: the codes must be equal
  (float32). Three
  settings: float32, bfloat16 weights, and float32 weights under bfloat16 autocast (what
  ``Pipeline(dtype="bf16")`` and ``t2i-generate dtype=bf16`` run; its floor counts bfloat16 bytes). ``--rounds``
  rounds, before, previous and after alternating, each with its own bandwidth probe; the median round by its
  ratio is kept. These steps include the sampler's work on the 16,384 logits (top-k, softmax, the draw).

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
OUTSIDE = DTYPES + ("autocast",)  # autocast: float32 weights under bfloat16 autocast (Pipeline(dtype="bf16"))
BATCHES = (1, 8, 32)
BASELINE = "803cda5"  # the last commit before the decode-step work (issue 29)
PREVIOUS = "3fe1a31"  # the last measured state (RESULTS_roofline.md before draw.c and the kept packed weights)


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


def build(geom: str, dtype, **changes):
    import torch

    from t2i.models.transformer import Transformer

    torch.manual_seed(0)
    return Transformer(**{**GEOMETRIES[geom], **changes}).eval().to(dtype)


def step_bytes(model, batch: int, kv_len: float, elsize: int) -> float:
    read = [model.blocks, model.ln_f] + ([model.logits_ln] if model.logits_ln is not None else []) + [model.image_head]
    weights = sum(p.numel() for m in read for p in m.parameters()) * elsize
    kv = 2 * model.n_layer * batch * model.n_head * model.head_dim * kv_len * elsize
    return weights + kv


def step_flops(model, batch: int, kv_len: float) -> float:
    read = [model.blocks, model.image_head]
    mat = sum(p.numel() for m in read for p in m.parameters() if p.dim() == 2)
    return 2 * batch * mat + 4 * model.n_layer * batch * model.n_head * model.head_dim * kv_len


def probe_bandwidth(big) -> float:
    """Read bandwidth now (GB/s): the median of 3 ``sum`` passes over ``big`` (1 GiB)."""
    return big.numel() * big.element_size() / median_time(big.sum, 3, 1) / 1e9


def linears_alone(model, cache, batch: int, dtype, steps: int) -> float | None:
    """Seconds of one pass over the packed linears of a decode step (the blocks' and the image head), back
    to back: from the cache's DecodeStep where it has one (residual GEMMs with their residual), else
    from its per-layer packed copies."""
    import torch

    def x(n):
        return torch.randn(batch, 1, n).to(dtype)

    calls = []
    packed = getattr(cache, "packed", {})
    for k, fn in packed.items():
        layer = k[0] if isinstance(k, tuple) else k
        if layer is not model.text_head:
            calls.append((fn, (x(layer.in_features),)))
    step = getattr(cache, "step", None)
    for b, layer in zip(model.blocks, step.layers if step is not None else ()):
        qkv, proj, fc, fc2 = layer[2:6]
        d, f = b.attn.proj.in_features, b.mlp.proj.in_features
        calls += [(qkv, (x(d),)), (fc, (x(d),))]
        calls += [(proj, (x(d), x(d))), (fc2, (x(f), x(d)))] if step.fused else [(proj, (x(d),)), (fc2, (x(f),))]
    if not calls:
        return None
    return median_time(lambda: [fn(*a) for fn, a in calls], steps)


def time_steps(model, batch: int, dtype, steps: int):
    """(seconds of one decode step at the middle of the image, the first position timed, the cache)."""
    import torch

    first = model.n_image // 2 - steps // 2 - 3  # timed steps straddle the middle of the image
    cache = model.new_cache(batch, "cpu", dtype)
    for k, v in zip(cache.k, cache.v):
        k.normal_()
        v.normal_()
    code = torch.randint(0, model.image_vocab, (batch,))
    i = iter(range(first, model.n_image))
    return median_time(lambda: model.decode_step(code, next(i), cache), steps), first, cache


def worker(geom: str, dtype_name: str, batches, steps: int) -> dict:
    import torch

    dtype = getattr(torch, dtype_name)
    model = build(geom, dtype)
    narrow = build(geom, dtype, d_model=4 * GEOMETRIES[geom]["n_head"])  # same operations, almost no bytes
    big = torch.ones(256 * 1024 * 1024)
    out = {}
    with torch.no_grad():
        for batch in batches:
            overhead = time_steps(narrow, batch, dtype, steps)[0]
            bw = probe_bandwidth(big)
            sec, first, cache = time_steps(model, batch, dtype, steps)
            lin = linears_alone(model, cache, batch, dtype, steps)
            # the timed steps feed codes first+3 .. first+3+steps-1; step j reads text_len + j + 1 positions
            kv_len = model.text_len + first + 3 + (steps - 1) / 2 + 1
            out[batch] = dict(step_s=sec, kv_len=kv_len, bytes=step_bytes(model, batch, kv_len, dtype.itemsize),
                              flops=step_flops(model, batch, kv_len), bandwidth_GBps=bw, linears_s=lin,
                              overhead_s=overhead,
                              linear_bytes=sum(p.numel() for m in (model.blocks, model.image_head)
                                               for p in m.parameters() if p.dim() == 2) * dtype.itemsize)
            del cache
    return out


def outside_worker(dtype_name: str, tail: int = 64, batch: int = 8) -> dict:
    """``generate`` on the muge geometry, one caption x ``batch``, primed so that ``tail`` codes are drawn."""
    import torch

    from t2i.sampling import generate

    amp = dtype_name == "autocast"  # float32 weights under bfloat16 autocast: what Pipeline(dtype="bf16") runs
    dtype = torch.bfloat16 if amp else getattr(torch, dtype_name)
    model = build("muge", torch.float32 if amp else dtype)
    g = torch.Generator().manual_seed(0)
    text = torch.randint(1, model.text_vocab, (1, model.text_len), generator=g)
    prime = torch.randint(0, model.image_vocab, (1, model.n_image - tail), generator=g)
    rep = prime.repeat_interleave(batch, 0)

    def new_cache():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            t0 = time.perf_counter()
            model.new_cache(batch, "cpu", dtype)
            return time.perf_counter() - t0

    cache_first, cache_next = new_cache(), new_cache()  # a process's first cache packs the weights; the next?

    def prefill():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            model.prefill(text.repeat_interleave(batch, 0), model.new_cache(batch, "cpu", dtype), rep)

    spent = []  # the seconds of the prefill generate itself runs, subtracted from its total (a prefill
    own = model.prefill  # timed apart is ~2.8 s of a ~4 s call, and its noise alone moved the step by +-2 ms)

    def timed_prefill(*a, **k):
        t0 = time.perf_counter()
        out = own(*a, **k)
        spent.append(time.perf_counter() - t0)
        return out

    model.prefill = timed_prefill

    def sample():
        spent.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            t0 = time.perf_counter()
            codes = generate(model, text, batch, top_k=256, prime=prime, generator=torch.Generator().manual_seed(1))
            return codes, time.perf_counter() - t0, sum(spent)

    pre = median_time(prefill, 1, warmup=1)  # warm: the first prefill allocates
    big = torch.ones(256 * 1024 * 1024)
    bw = probe_bandwidth(big)
    del big
    codes, total, pre = sample()
    codes2, total2, pre2 = sample()
    if total2 - pre2 < total - pre:
        total, pre = total2, pre2
    assert torch.equal(codes, codes2)
    kv_len = model.text_len + model.n_image - tail + (tail - 1) / 2  # steps feed codes n-tail .. n-2
    return dict(step_s=(total - pre) / (tail - 1), prefill_s=pre, generate_s=total, kv_len=kv_len, bandwidth_GBps=bw,
                cache_first_s=cache_first, cache_next_s=cache_next,
                bytes=step_bytes(model, batch, kv_len, dtype.itemsize), flops=step_flops(model, batch, kv_len),
                codes=codes.flatten().tolist())


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
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ a
            ts.append(time.perf_counter() - t0)
        out[f"{name}_GFLOPs"] = 2 * 2048**3 / min(ts[1:]) / 1e9  # a peak: the best repeat (a slow one flatters the ratios)
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


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def load_avg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--baseline", default=BASELINE)
    ap.add_argument("--previous", default=PREVIOUS)
    ap.add_argument("--rounds", type=int, default=5)
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
    tmp, tmp2 = tempfile.TemporaryDirectory(), tempfile.TemporaryDirectory()
    impls = {"before": extract(args.baseline, Path(tmp.name)), "previous": extract(args.previous, Path(tmp2.name)),
             "after": str(ROOT)}
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
        for r in range(rounds):
            for dtype in OUTSIDE:
                for impl, path in impls.items():
                    res = run_worker(args, path, dict(outside=True, dtype=dtype))
                    outside.setdefault(f"{dtype}/{impl}", []).append(res)
                    loads.append(load_avg())
                    print(r, "outside", dtype, impl, round(res["step_s"] * 1e3, 2), flush=True)
    loads.append(load_avg())
    end = matmul_peak(args.repeats)  # again at the end: the peak is the better of the two
    machine["matmul_peak"] = {k: max(v, end[k]) for k, v in machine["matmul_peak"].items()}
    write(args, machine, runs, outside, loads)


def floor(v: dict, peak: float) -> float:
    """A step's roofline (seconds): its bytes over the bandwidth probed right before it, or its FLOPs over
    the matmul peak, whichever is larger (at a few rows the first binds; on a CPU with little compute per
    byte, float32 at 8 rows and more is bound by the second)."""
    return max(v["bytes"] / (v["bandwidth_GBps"] * 1e9), v["flops"] / peak)


def ratio(v: dict, peak: float) -> float:
    """A step's time over its roofline."""
    return v["step_s"] / floor(v, peak)


def pick(rounds: list[dict], peak: float) -> dict:
    """Per batch, the round with the median ratio to its roofline."""
    out = {}
    for b in rounds[0]:
        ordered = sorted((r[b] for r in rounds), key=lambda v: ratio(v, peak))
        out[b] = ordered[len(ordered) // 2]
    return out


def median_round(rounds: list[dict], peak: float) -> dict:
    """The round with the median ratio to its roofline (each round's floor from its own bandwidth probe)."""
    return sorted(rounds, key=lambda v: ratio(v, peak))[len(rounds) // 2]


def write(args, machine, runs, outside, loads):
    import torch

    rows, data = [], {"machine": machine, "threads": args.threads, "baseline": args.baseline,
                      "previous": args.previous, "torch": torch.__version__, "load_average": loads, "steps": {},
                      "outside": {}}
    for key in sorted({k.rsplit("/", 1)[0] for k in runs}, key=lambda k: (k.split("/")[0] != "muge", k)):
        geom, dtype = key.split("/")
        peak = machine["matmul_peak"][f"{dtype}_GFLOPs"] * 1e9
        before, prev, after = (pick(runs[f"{key}/{impl}"], peak) for impl in ("before", "previous", "after"))
        for b in before:
            a, o, p = after[b], before[b], prev[b]
            memory = a["bytes"] / (a["bandwidth_GBps"] * 1e9)
            compute = a["flops"] / peak
            lin, over = a.get("linears_s"), a.get("overhead_s")
            data["steps"][f"{key}/{b}"] = dict(before=o, previous=p, after=a, memory_floor_s=memory,
                                               compute_floor_s=compute, roofline_s=max(memory, compute),
                                               ratio_before=ratio(o, peak), ratio_previous=ratio(p, peak),
                                               ratio_after=ratio(a, peak))
            spread = sorted(ratio(r[b], peak) for r in runs[f"{key}/after"])
            data["steps"][f"{key}/{b}"]["ratios_after"] = spread
            b = int(b)
            rows.append(f"| {geom} | {dtype} | {b} | {a['bytes'] / 1e6:.0f} | {a['bandwidth_GBps']:.1f} | "
                        f"{memory * 1e3:.2f} | {compute * 1e3:.2f} | " + (f"{over * 1e3:.2f} | " if over else "| ")
                        + f"{o['step_s'] * 1e3:.2f} | {p['step_s'] * 1e3:.2f} | "
                        f"{a['step_s'] * 1e3:.2f} | {ratio(o, peak):.2f}x | {ratio(p, peak):.2f}x | "
                        f"**{ratio(a, peak):.2f}x** | {spread[0]:.2f} - {spread[-1]:.2f} | "
                        f"{a['step_s'] / memory:.2f}x | {a['bytes'] / a['step_s'] / 1e9:.1f} | "
                        + (f"{lin * 1e3:.2f} ({a['linear_bytes'] / lin / 1e9:.1f} GB/s) | " if lin else "| ")
                        + f"{b / o['step_s']:.0f} / {b / a['step_s']:.0f} | {o['step_s'] / a['step_s']:.2f}x |")
    out_rows = []
    for dtype in OUTSIDE:
        if f"{dtype}/after" not in outside:
            continue
        peak = machine["matmul_peak"][f"{'bfloat16' if dtype == 'autocast' else dtype}_GFLOPs"] * 1e9
        same = all(r["codes"] == outside[f"{dtype}/after"][0]["codes"] for r in outside[f"{dtype}/before"] +
                   outside.get(f"{dtype}/previous", []) + outside[f"{dtype}/after"])
        o, a = (median_round(outside[f"{dtype}/{impl}"], peak) for impl in ("before", "after"))
        p = median_round(outside[f"{dtype}/previous"], peak) if f"{dtype}/previous" in outside else None
        spread = sorted(ratio(r, peak) for r in outside[f"{dtype}/after"])
        memory = a["bytes"] / (a["bandwidth_GBps"] * 1e9)
        compute = a["flops"] / peak
        data["outside"][dtype] = dict(before={k: v for k, v in o.items() if k != "codes"},
                                      previous={k: v for k, v in (p or {}).items() if k != "codes"},
                                      after={k: v for k, v in a.items() if k != "codes"}, memory_floor_s=memory,
                                      compute_floor_s=compute, roofline_s=max(memory, compute), same_codes=same,
                                      ratios_after=spread)
        o = dict(o, flops=o.get("flops", a["flops"]))
        label = "float32 weights, bfloat16 autocast" if dtype == "autocast" else dtype
        out_rows.append(f"| {label} | {a['bytes'] / 1e6:.0f} | {a['bandwidth_GBps']:.1f} | {memory * 1e3:.2f} | "
                        f"{compute * 1e3:.2f} | {o['step_s'] * 1e3:.2f} | "
                        + (f"{p['step_s'] * 1e3:.2f} | " if p else "- | ") + f"{a['step_s'] * 1e3:.2f} | "
                        f"{ratio(o, peak):.2f}x | " + (f"{ratio(p, peak):.2f}x | " if p else "- | ")
                        + f"**{ratio(a, peak):.2f}x** | {spread[0]:.2f} - {spread[-1]:.2f} | {a['step_s'] / memory:.2f}x | "
                        f"{8 / a['step_s']:.0f} | {o['cache_first_s'] * 1e3:.0f} / {o['cache_next_s'] * 1e3:.0f} | "
                        + (f"{p['cache_first_s'] * 1e3:.0f} / {p['cache_next_s'] * 1e3:.0f} | " if p else "- | ") +
                        f"{a['cache_first_s'] * 1e3:.0f} / {a['cache_next_s'] * 1e3:.0f} | {'yes' if same else 'no'} |")
    m = machine
    text = [
        "# Cached decode against the memory roofline",
        "",
        f"Command: `python experiments/transformer_speed/roofline.py{' --quick' if args.quick else ''}` "
        f"(method in its docstring). Machine: {platform.machine()}, {os.cpu_count()} logical CPUs "
        f"(shared with other jobs), `torch.set_num_threads({args.threads})`, torch {torch.__version__}; "
        f"load average (1 min) during the run {min(loads):.2f} - {max(loads):.2f} "
        f"(median {statistics.median(loads):.2f}). Before: git `{args.baseline}`; previous: git `{args.previous}`; "
        f"after: this tree. CPU: {cpu_name()}.",
        "",
        f"Read bandwidth at the start (1 GiB float32): sum {m['bandwidth']['sum_GBps']:.1f} GB/s, matrix-vector "
        f"{m['bandwidth']['mv_GBps']:.1f} GB/s -> roofline **{m['bandwidth']['read_GBps']:.1f} GB/s**; copy "
        f"{m['bandwidth']['copy_rw_GBps']:.1f} GB/s read + write. Matmul peak (2048^3): float32 "
        f"{m['matmul_peak']['float32_GFLOPs']:.0f} GFLOP/s, bfloat16 {m['matmul_peak']['bfloat16_GFLOPs']:.0f} GFLOP/s.",
        "",
        "## One cached decode step at the mean KV length",
        "",
        "The roofline of a step is the larger of its memory floor (bytes over the bandwidth probed right before "
        "that step was timed) and its compute floor (FLOPs over the matmul peak above); `x roofline` is the "
        "step over it (the median round of `--rounds`; `after, every round`: the lowest and highest of the after "
        "rounds' ratios, each against its own probe), `x memory` the after step over the memory floor alone. "
        "`bandwidth` and the floors are the after run's. `overhead floor`: the same model at `d_model = 4 x "
        "n_head` (every operation, almost no bytes), timed the same way: what the operations cost by themselves. "
        "`linears alone`: the step's packed linear layers back to back, nothing else (the GEMM library's floor "
        "at this batch).",
        "",
        "| geometry | dtype | batch | bytes/step MB | bandwidth GB/s | memory floor ms | compute floor ms | "
        "overhead floor ms | before ms | previous ms | after ms | before x roofline | previous x roofline | "
        "after x roofline | after, every round | after x memory | after GB/s | linears alone ms | image tokens/s "
        "before / after | speed-up |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]
    if out_rows:
        text += ["", "## From outside: `t2i.sampling.generate`, muge geometry, 1 caption x 8, top-k 256, 64 steps",
                 "", f"The median round of {len(next(iter(outside.values())))} by its ratio to the roofline (each "
                 "round's floor from the bandwidth probed right before it); a step is the call's time less the "
                 "prefill it ran, over its 63 decode steps (each with its draw), in a process that has made a cache "
                 "before (as every call after a process's first); `new_cache first / next`: a process's first "
                 "cache and the next one (packing the weights: before this tree, on every call); `same codes`: "
                 "every round of before and after drew the same codes.",
                 "", "| dtype | bytes/step MB | bandwidth GB/s | memory floor ms | compute floor ms | before ms/step | "
                 "previous ms/step | after ms/step | before x roofline | previous x roofline | after x roofline | "
                 "after, every round | after x memory | image tokens/s after | before new_cache ms first / next | previous new_cache ms "
                 "first / next | after new_cache ms first / next | same codes before / previous / after |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|", *out_rows]
    Path(args.out + ".md").write_text("\n".join(text) + "\n")
    Path(args.out + ".json").write_text(json.dumps(data, indent=1) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
