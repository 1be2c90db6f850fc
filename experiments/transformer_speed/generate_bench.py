"""``t2i-generate`` at the full MUGE geometry on this CPU: images per second before / after, same seed -> same images.

    python experiments/transformer_speed/generate_bench.py        # writes RESULTS_generate.{md,json}

The checkpoints are made here, from fixed seeds, in ``--work`` (nothing is downloaded):

- the image tokenizer: a ``VQGAN`` at ``muge_vqgan``'s architecture (256 px, f16: 16 x 16 codes over 16,384,
  cosine lookup in 32 dimensions), random weights, saved as a stage-1 checkpoint;
- the text tokenizer: a ``TextTokenizer`` trained on Chinese Shapes captions (its vocabulary is small; the
  text embedding and head are not read by a decode step, so the step's bytes are those of the real model);
- the transformer: ``muge_transformer``'s model (12 x 768, 12 heads, text 32, the dalle schedule, conv kernel
  11), random weights, written as ``t2i-train`` writes a ``TransformerModule`` checkpoint (hyper-parameters,
  state dict, the text tokenizer, the carried image tokenizer).

Each implementation runs the user's command in its own process, ``python -m t2i.cli.generate ckpt=...
prompts=[...] num_samples=8 batch_size=8 top_k=256 seed=0 device=cpu``, with ``PYTHONPATH`` at the package of
git revision ``--baseline`` (before the decode-step work), ``--previous`` (the last measured state) or the
work tree, alternating, for ``--rounds`` rounds (median kept). Reported per implementation: the command's wall
seconds (start-up, loading, sampling 8 x 256 codes, decoding 8 images, writing them), the seconds the command
itself reports for generation (sampling and decoding), images/s from both, and whether its PNG files are
byte-identical to the work tree's (same seed -> same codes and same decoded pixels, float32). ``--dtypes``
adds ``dtype=bf16`` runs (bfloat16 autocast, what ``Pipeline(dtype="bf16")`` does) for the revisions that have that key; speed-ups are against float32 ``before``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
from roofline import BASELINE, PREVIOUS, cpu_name, extract, load_avg  # noqa: E402

PROMPT = "一个大的红色圆形在左上角"
VQGAN = dict(ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16], z_channels=256,
             embed_dim=256, n_embed=16384, resolution=256, quantizer={"kind": "vq", "l2_normalize": True,
                                                                       "codebook_dim": 32})
MODEL = dict(n_layer=12, n_head=12, d_model=768, dropout=0.1, attention="dalle", conv_kernel=11, attn_impl="sdpa",
             text_len=32)


def make_checkpoints(work: Path) -> Path:
    """The VQGAN and transformer checkpoints (made once per ``work`` folder); the transformer's path."""
    import torch

    from t2i.data.shapes import iter_split
    from t2i.data.tokenizer import TextTokenizer
    from t2i.keys import TOKENIZER_KEY
    from t2i.lit.transformer import TransformerModule
    from t2i.models.records import tokenizer_entry
    from t2i.models.vqgan import VQGAN as Tokenizer

    ckpt = work / "muge_transformer.ckpt"
    if ckpt.exists():
        return ckpt
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    vq = Tokenizer(**VQGAN)
    torch.save({"state_dict": {"model." + k: v for k, v in vq.state_dict().items()},
                TOKENIZER_KEY: tokenizer_entry("t2i.models.vqgan.VQGAN", vq.config, "model.")}, work / "muge_vqgan.ckpt")
    captions = [s.caption for s in iter_split("train", 400, 0, 32, lang="zh")]
    tok = TextTokenizer.train(captions, vocab_size=300)
    torch.manual_seed(1)
    module = TransformerModule(model=dict(MODEL, text_vocab=tok.vocab_size, text_pad_id=tok.pad_id, image_vocab=16384,
                                          image_grid=[16, 16]),
                               image_tokenizer=str(work / "muge_vqgan.ckpt"), cond_drop_prob=0.1)
    state = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
             "datamodule": {"tokenizer": tok.to_str()}}
    module.on_save_checkpoint(state)
    torch.save(state, ckpt)
    return ckpt


def run_generate(pythonpath: str, ckpt: Path, out: Path, threads: int, num_samples: int, dtype: str = "fp32") -> dict:
    env = dict(os.environ, PYTHONPATH=pythonpath, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "t2i.cli.generate", f"ckpt={ckpt}", f"prompts=['{PROMPT}']",
           f"num_samples={num_samples}", f"batch_size={num_samples}", "top_k=256", "seed=0", "device=cpu",
           "progress=false", f"output={out}", f"hydra.run.dir={out}/hydra"] + ([] if dtype == "fp32" else [f"dtype={dtype}"])
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=out.parent)
    wall = time.perf_counter() - t0
    if res.returncode:
        raise SystemExit(f"t2i-generate failed under {pythonpath}:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    said = re.search(r"generated (\d+) images .* in ([0-9.]+) s", res.stdout + res.stderr)
    pngs = sorted(out.glob("p*_s*.png"))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in pngs)).hexdigest()
    return dict(wall_s=wall, generate_s=float(said.group(2)) if said else None, images=len(pngs), sha256=digest)


def knows(pythonpath: str, dtype: str) -> bool:
    """Does the package at ``pythonpath`` have ``t2i-generate dtype=`` (float32, the default, needs none)?"""
    conf = Path(pythonpath) / "t2i" / "conf" / "generate.yaml"
    return dtype == "fp32" or any(line.startswith("dtype:") for line in conf.read_text().splitlines())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "t2i_generate_bench"))
    ap.add_argument("--baseline", default=BASELINE)
    ap.add_argument("--previous", default=PREVIOUS)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--num-samples", type=int, default=8)
    ap.add_argument("--dtypes", default="fp32,bf16", help="t2i-generate dtype= settings (fp32: none given)")
    ap.add_argument("--out", default=str(HERE / "RESULTS_generate"))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    ckpt = make_checkpoints(work)
    tmp = tempfile.TemporaryDirectory()
    for name in ("before", "previous"):
        (Path(tmp.name) / name).mkdir()
    impls = {"before": extract(args.baseline, Path(tmp.name) / "before"),
             "previous": extract(args.previous, Path(tmp.name) / "previous"), "after": str(ROOT)}
    dtypes = args.dtypes.split(",")
    runs: dict = {f"{d}/{k}": [] for d in dtypes for k in impls if knows(impls[k], d)}
    loads = [load_avg()]
    for r in range(args.rounds):
        for dtype in dtypes:
            for impl, path in impls.items():
                if f"{dtype}/{impl}" not in runs:
                    continue
                out = work / f"{dtype}_{impl}_{r}"
                runs[f"{dtype}/{impl}"].append(run_generate(path, ckpt, out, args.threads, args.num_samples, dtype))
                loads.append(load_avg())
                print(r, dtype, impl, runs[f"{dtype}/{impl}"][-1], flush=True)
    write(args, runs, loads, dtypes)


def write(args, runs, loads, dtypes):
    import torch

    med = {k: {f: statistics.median(r[f] for r in v) for f in ("wall_s", "generate_s") if all(r[f] for r in v)}
           for k, v in runs.items()}
    rows = []
    for dtype in dtypes:
        ref = runs[f"{dtype}/after"][0]["sha256"]
        base = med["fp32/before"] if "fp32/before" in med else med[f"{dtype}/before"]
        for impl, rev in (("before", args.baseline), ("previous", args.previous), ("after", "this tree")):
            if f"{dtype}/{impl}" not in runs:
                continue
            m, n = med[f"{dtype}/{impl}"], runs[f"{dtype}/{impl}"][0]["images"]
            gen = m.get("generate_s")
            same = all(r["sha256"] == ref for r in runs[f"{dtype}/{impl}"])
            rows.append(f"| {dtype} | {impl} (`{rev}`) | {m['wall_s']:.1f} | {n / m['wall_s']:.3f} | "
                        + (f"{gen:.1f} | {n / gen:.3f} | {base['generate_s'] / gen:.2f}x | " if gen else "- | - | - | ")
                        + f"{'yes' if same else 'no'} |")
    text = [
        "# t2i-generate at the MUGE geometry",
        "",
        f"Command: `python experiments/transformer_speed/generate_bench.py` (method in its docstring). Machine: "
        f"{platform.machine()}, {os.cpu_count()} logical CPUs ({cpu_name()}), {args.threads} threads, torch "
        f"{torch.__version__}; load average (1 min) {min(loads):.2f} - {max(loads):.2f}. Each implementation: "
        f"`t2i-generate ... num_samples={args.num_samples} batch_size={args.num_samples} top_k=256 seed=0 "
        f"device=cpu` (and `dtype=bf16`: bfloat16 autocast for sampling and decoding) on the same checkpoints, "
        f"median of {args.rounds} rounds.",
        "",
        "| dtype | implementation | wall s | images/s (wall) | generation s (reported) | images/s (generation) | "
        "generation speed-up vs float32 before | same PNGs as after |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "`generation s` is what the command prints for sampling and decoding (start-up, loading and writing "
        "excluded); `same PNGs`: the image files are byte-identical to the work tree's at that dtype (float32: "
        "same codes, same pixels). A revision without `t2i-generate dtype=` has no bfloat16 row.",
    ]
    Path(args.out + ".md").write_text("\n".join(text) + "\n")
    Path(args.out + ".json").write_text(json.dumps({"runs": runs, "median": med, "loads": loads,
                                                    "baseline": args.baseline, "previous": args.previous}, indent=1) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
