"""Cached sampling speed: ours vs ruDALL-E's own cached generation, same weights, same run.

    python experiments/transformer_speed/rudalle_bench.py           # writes RESULTS_rudalle.md (+ .json)
    python experiments/transformer_speed/rudalle_bench.py --quick   # smaller, for a smoke run

One random-weight ruDALL-E ``DalleModel`` (``hf_version='v3'``, CogView sandwich LayerNorm, the
row / column / conv layer schedule, ruDALL-E's vocabularies: 16,384 BPE ids + 128 per-position pads,
8,192 image codes, text 128 tokens) is built from a fixed seed in every process and imported into our
``Transformer`` with ``t2i.pretrained.rudalle.infer_config`` / ``convert_dalle``. Size (see ``SIZE``):
12 layers, width 512, 8 heads, image 16x16 = 256 codes, batch 4, float32, one thread
(``--threads``). This 2-core machine is shared with other jobs; with 2 threads each, the processes
oversubscribe the cores and one image of ours took 61, 30 and 14 s in three back-to-back runs (load
average 4-6), so both sides run single-threaded, where a preempted thread stalls no partner. 12 layers keep three column layers and the final conv layer of ruDALL-E's schedule; the
16x16 grid keeps one whole image of the peer within about two minutes on this 2-core CPU (32x32 would
quadruple the steps and roughly double the per-step cost of the peer).

- (a) rudalle: the loop of ``rudalle.pipelines.generate_images`` -- per image token one call
  ``dalle(out, attention_mask, use_cache=True, cache=cache)``, the last position's image logits, divided
  by the temperature, top-k / top-p filtered, ``torch.multinomial``, appended. The model calls and the
  cache are rudalle's own. The pipeline itself cannot be imported as it is (its package ``__init__`` needs
  ``huggingface_hub.cached_download``, and it calls ``transformers.top_k_top_p_filtering``, which
  transformers 5 removed), so this script loads ``rudalle.dalle.model`` through stub packages and repeats
  the loop with ``top_k_top_p``, our re-statement of transformers 4's filter (keep the ``top_k`` largest;
  then drop a token once the sorted probabilities before it already exceed ``top_p``). The pipeline's
  perplexity re-scoring pass and the VQGAN decode come after sampling and are excluded, as for ours.
- (b) t2i: ``t2i.sampling.generate(model, text, top_k, top_p, use_cache=True)`` on the imported weights.

Both sample the same caption (``<BOS>``, 20 BPE ids, ``<EOS>``, pads to 128) repeated ``batch`` times
with ruDALL-E's suggested ``top_k=2048, top_p=0.995``, temperature 1, from the same seed of the global
torch generator (so equal logits and equal filters draw equal codes: the table reports the share), timed
over one whole image after a warm-up (rudalle: 16 steps; ours: one image, then the median of 3 images).
Each in its own process, ours once before and once after rudalle (the machine is shared: load drifts).
Cross-check in another process: both samplers run greedy (rudalle's loop with ``argmax`` in place of
filter + multinomial, which is what ``top_k=1`` draws; ours ``temperature=0``) on ``CHECK_BATCH``
captions and must give the same codes. For that the
model's layer norms, biases and position tables are randomised and the logits head scaled up so the top
two logits are far apart compared with float32 rounding (default init leaves near-ties).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench import matmul_peak  # noqa: E402  (same directory; the DALLE-pytorch benchmark)

SIZE = dict(n_layer=12, d_model=512, n_head=8, text_len=128, grid=16, batch=4, text_vocab=16384, image_vocab=8192)
QUICK = dict(n_layer=4, d_model=128, n_head=4, text_len=128, grid=8, batch=4, text_vocab=16384, image_vocab=8192)
TOP_K, TOP_P = 2048, 0.995
CHECK_BATCH = 1
BOS, EOS = 2, 3


# -- peer import ----------------------------------------------------------------------------------
def rudalle_module(name: str) -> types.ModuleType:
    """A submodule of ``rudalle`` without running its package ``__init__`` files (stub packages)."""
    spec = importlib.util.find_spec("rudalle")
    if spec is None:
        raise SystemExit("rudalle is not installed (pip install rudalle==1.1.3 --no-deps)")
    base = spec.submodule_search_locations[0]
    parts = name.split(".")
    for i in range(1, len(parts)):
        pkg = ".".join(parts[:i])
        if pkg not in sys.modules:
            stub = types.ModuleType(pkg)
            stub.__path__ = ["/".join([base, *parts[1:i]])]
            sys.modules[pkg] = stub
    return importlib.import_module(name)


# -- models ---------------------------------------------------------------------------------------
def dalle_model(size: dict, spread: bool = False, seed: int = 0):
    DalleModel = rudalle_module("rudalle.dalle.model").DalleModel
    torch.manual_seed(seed)
    model = DalleModel(device="cpu", num_layers=size["n_layer"], vocab_size=size["text_vocab"] + size["text_len"],
                       hidden_size=size["d_model"], num_attention_heads=size["n_head"], embedding_dropout_prob=0.0,
                       attention_dropout_prob=0.0, output_dropout_prob=0.0, text_seq_length=size["text_len"],
                       image_tokens_per_dim=size["grid"], image_vocab_size=size["image_vocab"],
                       cogview_sandwich_layernorm=True, cogview_pb_relax=True, is_bool_mask=True, hf_version="v3")
    if spread:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "layernorm" in name or name.startswith("to_logits.0"):
                    p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
                elif name.endswith("bias"):
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
                elif "pos" in name or "row" in name or "col" in name:
                    p.copy_(0.5 * torch.randn(p.shape, generator=g))
            model.to_logits[1].weight.mul_(4.0)
    return model.eval()


def imported(dalle, size: dict):
    from t2i.models.transformer import Transformer
    from t2i.pretrained import rudalle

    sd = dalle.state_dict()
    config = rudalle.infer_config(sd, size["text_len"], size["n_head"], "bench")
    model = Transformer(**config)
    model.load_state_dict(rudalle.convert_dalle(sd, config, "bench"), strict=True)
    return model.eval()


def captions(size: dict, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` captions as ruDALL-E's tokenizer lays them out: <BOS>, 20 BPE ids, <EOS>, pads (0)."""
    g = torch.Generator().manual_seed(seed)
    text = torch.zeros(n, size["text_len"], dtype=torch.long)
    text[:, 0] = BOS
    text[:, 1:21] = torch.randint(4, size["text_vocab"], (n, 20), generator=g)
    text[:, 21] = EOS
    return text


# -- the two samplers -------------------------------------------------------------------------------
def top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """transformers 4's ``top_k_top_p_filtering`` (min_tokens_to_keep=1), re-stated: -inf outside the
    ``top_k`` largest logits and after the point where the sorted probabilities before a token exceed ``top_p``."""
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        cum = ordered.softmax(-1).cumsum(-1)
        drop = torch.zeros_like(cum, dtype=torch.bool)
        drop[..., 1:] = cum[..., :-1] > top_p  # the token that crosses top_p stays
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def rudalle_generate(dalle, text: torch.Tensor, top_k: int, top_p: float, temperature: float = 1.0,
                     greedy: bool = False, steps: int | None = None) -> torch.Tensor:
    """``rudalle.pipelines.generate_images``' sampling loop (cached), codes ``[B, n_image]`` (the first
    ``steps`` only when given: the warm-up)."""
    vocab = dalle.get_param("vocab_size")
    total = dalle.get_param("total_seq_length")
    mask = torch.tril(torch.ones((text.shape[0], 1, total, total)))
    out, cache = text, None
    for _ in range(text.shape[1], total if steps is None else text.shape[1] + steps):
        logits, cache = dalle(out, mask, use_cache=True, cache=cache, return_loss=False)
        logits = logits[:, -1, vocab:]
        if greedy:
            sample = logits.argmax(-1, keepdim=True)
        else:
            probs = top_k_top_p(logits / temperature, top_k, top_p).softmax(-1)
            sample = torch.multinomial(probs, 1)
        out = torch.cat((out, sample), dim=-1)
    return out[:, text.shape[1]:]


def t2i_generate(model, text: torch.Tensor, top_k: int, top_p: float, greedy: bool = False,
                 steps: int | None = None) -> torch.Tensor:
    """Our sampler; the global torch generator, as rudalle's ``torch.multinomial`` (``steps``: ignored)."""
    from t2i.sampling import generate

    if greedy:
        return generate(model, text, 1, temperature=0, use_cache=True).flatten(1)
    return generate(model, text, 1, top_k=top_k, top_p=top_p, use_cache=True,
                    generator=torch.default_generator).flatten(1)


# -- measurements (each in its own process) -------------------------------------------------------
def sample(size: dict, which: str) -> dict:
    dalle = dalle_model(size)
    model = imported(dalle, size) if which == "ours" else dalle
    text = captions(size, 1).repeat(size["batch"], 1)  # generate_images: one caption, bs samples
    fn = t2i_generate if which == "ours" else rudalle_generate
    torch.manual_seed(1)
    fn(model, text[:1], TOP_K, TOP_P, steps=16)  # warm-up (ours: a whole image, a fraction of a second)
    runs = []
    for _ in range(1 if which == "rudalle" else 3):  # ours: median of 3 (a fraction of a second each)
        torch.manual_seed(0)  # the same random stream for both: equal filters and logits draw equal codes
        t0 = time.perf_counter()
        codes = fn(model, text, TOP_K, TOP_P)
        runs.append(time.perf_counter() - t0)
    seconds = sorted(runs)[len(runs) // 2]
    n = size["grid"] ** 2
    assert codes.shape == (size["batch"], n)
    return {"tokens_per_s": size["batch"] * n / seconds, "seconds": seconds, "runs_s": runs,
            "load_avg": os.getloadavg()[0], "distinct_codes": int(codes.unique().numel()), "codes": codes.tolist()}


def greedy_check(size: dict) -> dict:
    dalle = dalle_model(size, spread=True, seed=5)
    model = imported(dalle, size)
    text = captions(size, CHECK_BATCH, seed=3)
    theirs = rudalle_generate(dalle, text, 1, 1.0, greedy=True)
    ours = t2i_generate(model, text, 1, 1.0, greedy=True)
    same = ours == theirs
    first = int((~same).flatten().nonzero()[0]) if not same.all() else None
    return {"equal": bool(same.all()), "codes": same.numel(), "differ": int((~same).sum()),
            "first_difference": first, "distinct_codes": int(theirs.unique().numel())}


def child(spec: str, quick: bool, threads: int) -> None:
    torch.set_flush_denormal(True)
    torch.set_num_threads(threads)
    size = QUICK if quick else SIZE
    out = greedy_check(size) if spec == "greedy" else sample(size, spec.replace("_again", ""))
    print("RESULT " + json.dumps(out))


def run_child(spec: str, quick: bool, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", spec, "--threads", str(threads)] + (["--quick"] if quick else [])
    res = subprocess.run(cmd, capture_output=True, text=True)
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    if res.returncode or not line:
        raise RuntimeError(f"{spec} failed:\n{res.stderr[-3000:]}")
    out = json.loads(line[-1][7:])
    print(spec, {k: v for k, v in out.items() if k != "codes"}, flush=True)
    return out


SPECS = ["greedy", "ours", "rudalle", "ours_again"]  # ours before and after: load drift


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(HERE / "RESULTS_rudalle.md"))
    args = ap.parse_args()
    if args.child:
        child(args.child, args.quick, args.threads)
        return
    size = QUICK if args.quick else SIZE
    torch.set_num_threads(args.threads)
    peak = matmul_peak()
    print(f"float32 matmul peak: {peak / 1e9:.1f} GFLOP/s", flush=True)
    results = {spec: run_child(spec, args.quick, args.threads) for spec in SPECS}
    codes = {spec: torch.tensor(results[spec].pop("codes")) for spec in ("rudalle", "ours", "ours_again")}
    results["sampled_codes_equal"] = {
        "rudalle_vs_ours": float((codes["ours"] == codes["rudalle"]).float().mean()),
        "ours_vs_ours_again": float((codes["ours"] == codes["ours_again"]).float().mean())}
    command = "python experiments/transformer_speed/rudalle_bench.py" + (" --quick" if args.quick else "") + (
        f" --threads {args.threads}" if args.threads != 1 else "")
    Path(args.out).with_suffix(".json").write_text(json.dumps(
        {"command": command, "size": size, "top_k": TOP_K, "top_p": TOP_P, "peak": peak, "threads":
         torch.get_num_threads(), "torch": torch.__version__, "results": results}, indent=1))
    write(args.out, command, size, peak, results)


def write(path: str, command: str, size: dict, peak: float, r: dict) -> None:
    p, g, eq = r["rudalle"], r["greedy"], r["sampled_codes_equal"]
    o = min(r["ours"], r["ours_again"], key=lambda x: x["tokens_per_s"])  # the slower of ours: conservative
    verdict = ("identical" if g["equal"] else
               f"**DIFFERENT** ({g['differ']} of {g['codes']} differ, first at flat index {g['first_difference']})")
    lines = [
        "# Cached sampling speed: t2i vs ruDALL-E (imported weights)",
        "",
        f"Command: `{command}` (method in its docstring). Machine: {platform.machine()}, "
        f"torch threads: {torch.get_num_threads()}, torch {torch.__version__}, float32, CPU; each number from its own "
        f"process, same run. Measured float32 matmul peak: {peak / 1e9:.1f} GFLOP/s.",
        f"Size: random-weight ruDALL-E v3 `DalleModel`, {size['n_layer']} layers, width {size['d_model']}, "
        f"{size['n_head']} heads, sandwich LayerNorm, row/column/conv schedule, text {size['text_len']} "
        f"(vocabulary {size['text_vocab']} + {size['text_len']} pads), image {size['grid']}x{size['grid']}, "
        f"codebook {size['image_vocab']}, batch {size['batch']}; t2i runs the same weights imported with "
        "`t2i.pretrained.rudalle.convert_dalle`.",
        "",
        f"## Sampling one image per row (top_k={TOP_K}, top_p={TOP_P}, temperature 1; image tokens/s)",
        "",
        "| rudalle cached loop (`use_cache=True`) | t2i `generate(use_cache=True)`, before / after rudalle "
        "| t2i (slower run) / rudalle |",
        "|---|---|---|",
        f"| {p['tokens_per_s']:.1f} ({p['seconds']:.1f} s) | {r['ours']['tokens_per_s']:.1f} "
        f"({r['ours']['seconds']:.2f} s) / {r['ours_again']['tokens_per_s']:.1f} ({r['ours_again']['seconds']:.2f} s) "
        f"| **{o['tokens_per_s'] / p['tokens_per_s']:.1f}x** |",
        "",
        f"1-minute load average when each finished (2 cores, shared machine): rudalle {p['load_avg']:.2f}, t2i "
        f"{r['ours']['load_avg']:.2f} / {r['ours_again']['load_avg']:.2f}. Both sampled from the same seed of the "
        f"global torch generator: {100 * eq['rudalle_vs_ours']:.1f}% of the {size['batch'] * size['grid'] ** 2} "
        f"sampled codes equal rudalle's ({100 * eq['ours_vs_ours_again']:.1f}% between our two runs).",
        "",
        f"## Greedy cross-check (captions: {CHECK_BATCH}; rudalle argmax loop vs t2i temperature 0)",
        "",
        f"Codes {verdict}: {g['codes']} codes compared, {g['distinct_codes']} distinct code values drawn.",
        "",
    ]
    Path(path).write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
