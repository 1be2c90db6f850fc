"""The real MUGE road at full geometry, as a dry run on a CPU: every stage through the user's CLIs and configs.

    .venv/bin/python experiments/real_scale/run.py --out outputs/real_scale          # writes RESULTS.md there

1. a synthetic MUGE-format set: ``--n`` Shapes pictures rendered at 256 px, base64 JPEG, as an EasyNLP TSV
   (``id \\t text \\t base64``) for training and as MUGE's own ``T2I_val.text.tsv`` / ``T2I_val.img.tsv``
   for ``eval=muge``;
2. ``t2i-data convert`` (TSV -> shards) and ``t2i-data tokenizer`` (the text tokenizer);
3. ``t2i-train experiment=muge_vqgan`` (the f16-16384 VQGAN at its real architecture, random init) for a
   few steps, LPIPS off (no VGG weights here; ``model.loss.perceptual_weight=0``);
4. ``t2i-tokenize`` its ``best.ckpt`` -> code shards (16x16 of 16384);
5. ``t2i-train experiment=muge_transformer`` at full size (12 x 768, text 32 + 256 image tokens) for a
   few steps (``attn_impl=sdpa``: the config's ``flex`` is the GPU path);
6. ``t2i-generate`` with the transformer's ``best.ckpt``;
7. ``t2i-eval eval=muge`` with a random-weight Inception at the real architecture (never downloaded).

Per stage it records wall seconds and the peak RSS of the stage's process (``os.wait4``), per training step
the seconds (``step_timer.StepTimer``), and in this process the FLOPs per step
(``torch.utils.flop_counter.FlopCounterMode``) and the bytes saved for backward per sample, from which it
computes the expected time and memory per stage on an A100-class GPU. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
A100_PEAK = 312e12   # bf16 dense tensor-core FLOP/s of an A100
MFU = 0.40           # assumed model-FLOPs utilisation
BERT_VOCAB = 21128   # bert-base-chinese's vocab.txt


# -- 1. data -----------------------------------------------------------------------------------------------
def jpeg_base64(image) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=90)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def write_data(data: Path, n: int, n_val: int) -> dict:
    """EasyNLP TSVs (train, val) and MUGE's native val files, from Shapes pictures at 256 px."""
    from t2i.data.shapes import iter_split

    (data / "easynlp").mkdir(parents=True, exist_ok=True)
    (data / "muge").mkdir(parents=True, exist_ok=True)
    rows = [(f"{i:06d}", s.caption, jpeg_base64(s.image)) for i, s in enumerate(iter_split("train", n, 0, 256))]
    train, val = rows[:n - n_val], rows[n - n_val:]
    for name, part in (("T2I_train.tsv", train), ("T2I_val.tsv", val)):
        (data / "easynlp" / name).write_text("".join(f"{k}\t{t}\t{b}\n" for k, t, b in part), encoding="utf-8")
    (data / "muge" / "T2I_val.text.tsv").write_text("".join(f"{k}\t{t}\n" for k, t, _ in val), encoding="utf-8")
    (data / "muge" / "T2I_val.img.tsv").write_text("".join(f"{k}\t{b}\n" for k, _, b in val), encoding="utf-8")
    return {"train": len(train), "val": len(val)}


def random_inception(path: Path) -> Path:
    """torch-fidelity's FID Inception (inception-v3-compat) at random init, saved as its weights file."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe
    from torch import nn

    class Unloaded(fe.FeatureExtractorInceptionV3):
        def load_state_dict(self, *a, **k):
            return None

    original = fe.load_state_dict_from_url
    fe.load_state_dict_from_url = lambda *a, **k: {}
    try:
        torch.manual_seed(0)
        net = Unloaded("inception-v3-compat", ["2048"])
    finally:
        fe.load_state_dict_from_url = original
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(nn.Module.state_dict(net), path)
    return path


# -- running a CLI stage -------------------------------------------------------------------------------------
def run_stage(name: str, module: str, args: list[str], cwd: Path, log: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)]), "WANDB_MODE": "offline",
           "HYDRA_FULL_ERROR": "1"}
    cmd = [sys.executable, "-m", module, *args]
    program = "t2i-" + module.rsplit(".", 1)[1].replace("evaluate", "eval")  # the console script's name
    print(f"[{name}] {shlex.join([program, *args])}", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"stage {name} failed (exit {code}); log {log}:\n{tail}")
    result = {"stage": name, "seconds": round(seconds, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024),
              "command": [program, *args]}
    print(f"[{name}] {result['seconds']} s, peak RSS {result['peak_rss_mib']} MiB", flush=True)
    return result


def step_stats(path: Path) -> dict:
    rec = json.loads(path.read_text())
    s = rec["step_seconds"]
    later = s[1:] or s  # the first step pays for lazy initialisation
    return {"steps": len(s), "first_step_s": round(s[0], 2), "step_s": round(sum(later) / len(later), 2)}


# -- FLOPs and activation bytes ------------------------------------------------------------------------------
def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for backward during ``fn`` (activation memory, fp32 here)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def measure(vqgan_ckpt: Path, transformer_ckpt: Path) -> dict:
    """FLOPs per sample of each stage's work, parameters, and activation bytes per training sample."""
    from t2i.models.transformer import Transformer
    from t2i.pretrained.image_tokenizers import load_tokenizer
    from t2i.sampling import generate

    torch.manual_seed(0)
    hp = torch.load(transformer_ckpt, map_location="cpu", weights_only=False)["hyper_parameters"]
    model = Transformer(**hp["model"]).train()
    n_params = sum(p.numel() for p in model.parameters())
    # the same model over bert-base-chinese's 21,128-word vocabulary (EasyNLP's text ids; the synthetic
    # captions here only fill a small one): more embedding and text-head parameters, ~1% more FLOPs
    n_params_bert = sum(p.numel() for p in Transformer(**{**hp["model"], "text_vocab": BERT_VOCAB}).parameters())
    text_len, (gh, gw), vocab = hp["model"]["text_len"], hp["model"]["image_grid"], hp["model"]["image_vocab"]
    text = torch.randint(1, hp["model"]["text_vocab"], (1, text_len))
    codes = torch.randint(0, vocab, (1, gh, gw))

    def step():
        t_loss, i_loss = model.loss(text, codes)
        ((t_loss + 7 * i_loss) / 8).backward()

    train_flops = count_flops(step)
    model.zero_grad(set_to_none=True)
    act = saved_bytes(lambda: sum(model.loss(text, codes)))
    model.eval()
    with torch.no_grad():
        sample_flops = count_flops(lambda: generate(model, text, num_samples=1, top_k=256,
                                                    generator=torch.Generator().manual_seed(0)))

    tok = load_tokenizer(str(vqgan_ckpt)).eval()
    image = torch.rand(1, 3, 256, 256) * 2 - 1
    with torch.no_grad():
        enc = count_flops(lambda: tok.encode(image))
        dec = count_flops(lambda: tok.decode(tok.encode(image)))  - enc
    tok.train().requires_grad_(True)  # load_tokenizer hands out a frozen module
    gen_params = list(tok.parameters())

    def vq_step():  # the generator's forward + backward before the discriminator starts (disc_start)
        (tok.decode_latent(tok.encode_to_latent(image)) - image).abs().mean().backward()

    vq_train = count_flops(vq_step)
    for p in gen_params:
        p.grad = None
    vq_act = saved_bytes(lambda: tok.decode_latent(tok.encode_to_latent(image)))
    return {"transformer_params": n_params, "transformer_params_bert_vocab": n_params_bert,
            "n_layer": hp["model"]["n_layer"], "d_model": hp["model"]["d_model"], "text_vocab": hp["model"]["text_vocab"],
            "vqgan_params": sum(p.numel() for p in tok.parameters()),
            "seq": text_len + gh * gw, "transformer_train_flops_per_sample": train_flops,
            "transformer_act_bytes_per_sample_fp32": act, "sample_flops_per_image": sample_flops,
            "vqgan_encode_flops_per_image": enc, "vqgan_decode_flops_per_image": dec,
            "vqgan_train_flops_per_image": vq_train, "vqgan_act_bytes_per_image_fp32": vq_act}


# -- the report ----------------------------------------------------------------------------------------------
def a100_seconds(flops: float) -> float:
    return flops / (A100_PEAK * MFU)


def report(stages: list[dict], m: dict, args, out: Path, command: str) -> str:
    g = 1e9
    lines = [
        "# Real-scale dry run: the MUGE road at full geometry on a CPU",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs "
        f"(shared with other jobs while measured), torch {torch.__version__}. "
        f"Data: {args.n} synthetic Shapes pictures at 256 px as base64 JPEG in an EasyNLP TSV "
        f"({args.n - args.n_val} train, {args.n_val} val; the val part also as MUGE's native "
        "`T2I_val.{text,img}.tsv`). Every stage is the user's CLI with the committed experiment config; the "
        "overrides are only sizes (steps, batch, captions), CPU settings and the measuring callback.",
        "",
        "## Per stage on this CPU",
        "",
        "| stage | command (abridged) | wall s | peak RSS MiB | per unit |",
        "|---|---|---:|---:|---|",
    ]
    for s in stages:
        cmd = " ".join(a for a in s["command"] if not a.startswith(("hydra.", "+callbacks.step_timer", "paths.")))
        cmd = cmd.replace(str(out), "<out>")
        unit = s.get("unit", "")
        lines.append(f"| {s['stage']} | `{cmd[:160]}` | {s['seconds']} | {s['peak_rss_mib']} | {unit} |")
    tp, vp = m["transformer_params"], m["vqgan_params"]
    tf, sf = m["transformer_train_flops_per_sample"], m["sample_flops_per_image"]
    enc, dec, vq = m["vqgan_encode_flops_per_image"], m["vqgan_decode_flops_per_image"], m["vqgan_train_flops_per_image"]
    lines += [
        "",
        "Wall seconds include the process start (imports, config, data checks); training steps are timed by "
        "`step_timer.StepTimer` (first step apart: it pays for lazy initialisation). The two cores were shared "
        "with other jobs throughout, so the seconds vary by 2x from step to step; the FLOPs below do not. "
        "Sampling on this CPU is bound by per-operation overhead, not arithmetic: one cached decode step of "
        "the full model at batch 2 (0.4 GFLOP) took 0.2 s alone, several times that under load.",
        "",
        "`t2i-eval` ran with a random-weight Inception (torch-fidelity's architecture, never downloaded): "
        "its features are nearly constant, so the FID / IS it printed (about 0 and 1) show that the path "
        "runs, not quality. The same holds for the random-init VQGAN and the few-step transformer: the "
        "pictures are noise.",
        "",
        "## FLOPs (measured with `torch.utils.flop_counter.FlopCounterMode`)",
        "",
        "| what | FLOPs |",
        "|---|---:|",
        f"| transformer parameters (this run's {m.get('text_vocab', 'small')}-word text vocabulary) | {tp / 1e6:.1f} M |",
        f"| the same over bert-base-chinese's {BERT_VOCAB:,}-word vocabulary | {m['transformer_params_bert_vocab'] / 1e6:.1f} M |",
        f"| transformer training step, forward + backward, per sample ({m['seq']} tokens) | {tf / g:.1f} G |",
        f"| transformer activations saved for backward, per sample (fp32) | {m['transformer_act_bytes_per_sample_fp32'] / 2**20:.0f} MiB |",
        f"| sampling one image (256 tokens, KV cache) | {sf / g:.1f} G |",
        f"| VQGAN parameters (encoder + decoder + codebook) | {vp / 1e6:.1f} M |",
        f"| VQGAN encode, per 256 px image | {enc / g:.1f} G |",
        f"| VQGAN decode, per image | {dec / g:.1f} G |",
        f"| VQGAN generator step (encode + decode, forward + backward, L1; no LPIPS, no discriminator), per image | {vq / g:.1f} G |",
        f"| VQGAN activations saved for backward, per image (fp32) | {m['vqgan_act_bytes_per_image_fp32'] / 2**20:.0f} MiB |",
        "",
        f"## Expected on an A100-class GPU (computed: {A100_PEAK / 1e12:.0f} TFLOP/s bf16 peak at {MFU:.0%} MFU)",
        "",
    ]
    lines += a100_table(m)
    return "\n".join(lines) + "\n"


def a100_table(m: dict) -> list[str]:
    tp = m["transformer_params_bert_vocab"]
    tf, sf = m["transformer_train_flops_per_sample"], m["sample_flops_per_image"]
    enc, dec, vq = m["vqgan_encode_flops_per_image"], m["vqgan_decode_flops_per_image"], m["vqgan_train_flops_per_image"]
    # KV cache of t2i-eval's default batch: 16 captions x 32 candidates, bf16 keys and values per layer
    kv = 16 * 32 * m["n_layer"] * 2 * m["seq"] * m["d_model"] * 2 / 2**30
    # memory: fp32 master weights 4 B + grads 4 B + AdamW 8 B (+ EMA 4 B) per parameter; bf16 activations
    # take about half the fp32 bytes measured here
    t_state = tp * (4 + 4 + 8 + 4) / 2**30
    t_act = m["transformer_act_bytes_per_sample_fp32"] / 2 / 2**30
    vq_state = m["vqgan_params"] * (4 + 4 + 8) / 2**30
    vq_act = m["vqgan_act_bytes_per_image_fp32"] / 2 / 2**30
    train_batch, steps = 32, 90_000 // 32 * 40           # muge_transformer: batch 32 per GPU, 40 epochs of 90k
    hours_t = a100_seconds(tf * 90_000 * 40) / 3600
    hours_vq = a100_seconds(vq * 90_000 * 50) / 3600      # muge_vqgan: 50 epochs (+ LPIPS and the discriminator)
    tok_min = a100_seconds(enc * 95_000) / 60
    eval_h = a100_seconds((sf + dec) * 5000 * 32) / 3600
    return [
        "| stage | work | compute | A100 time | memory |",
        "|---|---|---:|---:|---|",
        f"| VQGAN (`muge_vqgan`) | 90k images x 50 epochs | {vq / 1e9:.0f} GFLOP per image (generator only) | "
        f"{hours_vq:.0f} GPU-h, more with LPIPS (+VGG16) and the discriminator after step 30k | "
        f"{vq_state:.1f} GiB state + {vq_act:.2f} GiB activations per image (bf16; batch 12: {vq_state + 12 * vq_act:.0f} GiB) |",
        f"| `t2i-tokenize` | 95k images (train + val) | {enc / 1e9:.0f} GFLOP per image | {tok_min:.1f} GPU-min of model compute (JPEG decoding and loading can bound it) | "
        "weights + batch only |",
        f"| transformer (`muge_transformer`) | 90k pairs x 40 epochs ({steps:,} steps at global batch 32) | "
        f"{tf / 1e9:.0f} GFLOP per sample | {hours_t:.1f} GPU-h; on 8 GPUs {hours_t / 8:.1f} h | "
        f"{t_state:.1f} GiB state + {t_act:.2f} GiB activations per sample (batch {train_batch}: "
        f"{t_state + train_batch * t_act:.0f} GiB) |",
        f"| `t2i-eval eval=muge` | 5,000 captions x 32 candidates | {(sf + dec) / 1e9:.0f} GFLOP per candidate "
        f"(sample {sf / 1e9:.0f} + decode {dec / 1e9:.0f}) | {eval_h:.1f} GPU-h; on 8 GPUs {eval_h * 60 / 8:.0f} min "
        f"(sampling 256 steps is bound by memory traffic, not FLOPs: expect more) | bf16 weights "
        f"{tp * 2 / 2**30:.2f} GiB + KV cache {kv:.1f} GiB for 16 captions x 32 candidates |",
        "",
        "Memory counts fp32 weights, gradients, AdamW moments and (transformer) EMA weights per parameter, and "
        "half the fp32 activation bytes measured here for bf16 autocast; it leaves out the CUDA context and "
        "allocator slack (add 1-3 GiB).",
    ]


# -- the road ------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "real_scale")
    ap.add_argument("--n", type=int, default=64, help="synthetic images in all")
    ap.add_argument("--n-val", type=int, default=8)
    ap.add_argument("--vqgan-steps", type=int, default=2)
    ap.add_argument("--vqgan-batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="transformer training steps")
    ap.add_argument("--batch", type=int, default=4, help="transformer batch")
    ap.add_argument("--samples", type=int, default=2, help="t2i-generate samples per prompt")
    ap.add_argument("--captions", type=int, default=4, help="t2i-eval captions")
    ap.add_argument("--candidates", type=int, default=2, help="t2i-eval candidates per caption")
    ap.add_argument("--results", type=Path, default=None, help="also write the table here (RESULTS.md)")
    ap.add_argument("--report-only", action="store_true",
                    help="skip the CLI stages: re-measure FLOPs and rewrite the report from <out>/stages.json")
    args = ap.parse_args(argv)
    command = "python experiments/real_scale/run.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    out = args.out.resolve()
    data, runs, logs = out / "data", out / "runs", out / "logs"
    if args.report_only:
        saved = json.loads((out / "stages.json").read_text())
        return finish(saved["stages"], saved["args"], saved["command"], out, args.results)
    for d in (data, runs, logs):
        d.mkdir(parents=True, exist_ok=True)
    stages: list[dict] = []

    t0 = time.perf_counter()
    write_data(data, args.n, args.n_val)
    stages.append({"stage": "synthetic TSV", "command": ["(in-process) Shapes 256 px -> base64 JPEG TSV"],
                   "seconds": round(time.perf_counter() - t0, 1), "peak_rss_mib": 0, "unit": f"{args.n} images"})
    inception = random_inception(data / "weights-inception-random.pth")

    shards = data / "shards"
    for split in ("train", "val"):
        stages.append(run_stage(f"convert {split}", "t2i.cli.data", [
            "convert", "source=easynlp_tsv", f"input={data / 'easynlp' / f'T2I_{split}.tsv'}",
            f"output={shards / split}", "overwrite=true", "progress=false", f"hydra.run.dir={runs / ('convert_' + split)}"],
            out, logs / f"convert_{split}.log"))
    tokenizer = shards / "tokenizer.json"
    stages.append(run_stage("text tokenizer", "t2i.cli.data", [
        "tokenizer", f"input={data / 'easynlp' / 'T2I_train.tsv'}", f"output={tokenizer}", "vocab_size=500",
        f"hydra.run.dir={runs / 'text_tokenizer'}"], out, logs / "tokenizer.log"))

    wds = [f"data.train={shards / 'train'}/shard-000000.tar", f"data.val={shards / 'val'}/shard-000000.tar",
           f"data.tokenizer={tokenizer}", "data.num_workers=0"]
    vq_run = runs / "vqgan"
    stages.append(run_stage("VQGAN train (muge_vqgan)", "t2i.cli.train", [
        "experiment=muge_vqgan", "data=wds", *wds, f"data.batch_size={args.vqgan_batch}",
        "model.loss.perceptual_weight=0", f"+trainer.limit_train_batches={args.vqgan_steps}",
        "+trainer.limit_val_batches=1", "trainer.max_epochs=1", "trainer.num_sanity_val_steps=0",
        "trainer.enable_progress_bar=false", "logger=csv", "test=false",
        "+callbacks.step_timer._target_=step_timer.StepTimer", f"+callbacks.step_timer.path={vq_run / 'steps.json'}",
        f"hydra.run.dir={vq_run}"], out, logs / "vqgan.log"))
    stages[-1].update(step_stats(vq_run / "steps.json"))
    stages[-1]["unit"] = f"{stages[-1]['step_s']} s/step at batch {args.vqgan_batch} (first {stages[-1]['first_step_s']} s)"
    vq_ckpt = vq_run / "checkpoints" / "best.ckpt"

    codes = data / "codes" / "muge_256"
    stages.append(run_stage("t2i-tokenize", "t2i.cli.tokenize", [
        f"tokenizer_ckpt={vq_ckpt}", "data=wds", *wds, "data.image_size=256", f"output={codes}", "batch_size=8",
        "device=cpu", "progress=false", f"hydra.run.dir={runs / 'tokenize'}"], out, logs / "tokenize.log"))
    stages[-1]["unit"] = f"{stages[-1]['seconds'] / args.n:.2f} s/image incl. start-up ({args.n} images)"

    tr_run = runs / "transformer"
    stages.append(run_stage("transformer train (muge_transformer)", "t2i.cli.train", [
        "experiment=muge_transformer", f"data.codes={codes}", f"data.batch_size={args.batch}", "data.num_workers=0",
        "model.model.attn_impl=sdpa", "model.sample.num_captions=1", f"+trainer.limit_train_batches={args.steps}",
        "+trainer.limit_val_batches=1", "trainer.max_epochs=1", "trainer.num_sanity_val_steps=0",
        "trainer.enable_progress_bar=false", "logger=csv", "test=false",
        "+callbacks.step_timer._target_=step_timer.StepTimer", f"+callbacks.step_timer.path={tr_run / 'steps.json'}",
        f"hydra.run.dir={tr_run}"], out, logs / "transformer.log"))
    stages[-1].update(step_stats(tr_run / "steps.json"))
    stages[-1]["unit"] = f"{stages[-1]['step_s']} s/step at batch {args.batch} (first {stages[-1]['first_step_s']} s)"
    tr_ckpt = tr_run / "checkpoints" / "best.ckpt"

    stages.append(run_stage("t2i-generate", "t2i.cli.generate", [
        f"ckpt={tr_ckpt}", "prompts=['一个大的红色圆形在左上角']", f"num_samples={args.samples}", "top_k=256",
        "device=cpu", "progress=false", f"output={out / 'samples'}", f"hydra.run.dir={runs / 'generate'}"],
        out, logs / "generate.log"))
    stages[-1]["unit"] = f"{stages[-1]['seconds'] / args.samples:.1f} s/image incl. start-up ({args.samples} images)"

    stages.append(run_stage("t2i-eval eval=muge", "t2i.cli.evaluate", [
        "eval=muge", f"ckpt={tr_ckpt}", f"paths.data_dir={data}", f"eval.num_captions={args.captions}",
        f"eval.num_candidates={args.candidates}", f"metrics.feature_extractor_weights_path={inception}",
        "metrics.is_splits=2", "metrics.cache_dir=null", f"batch_size={args.captions}", "device=cpu",
        "progress=false", f"output={runs / 'eval'}", f"hydra.run.dir={runs / 'eval'}"], out, logs / "eval.log"))
    n_img = args.captions * args.candidates
    stages[-1]["unit"] = f"{stages[-1]['seconds'] / n_img:.1f} s/candidate incl. start-up ({n_img} candidates)"
    sizes = {k: v for k, v in vars(args).items() if k not in ("out", "results", "report_only")}
    (out / "stages.json").write_text(json.dumps({"stages": stages, "args": sizes, "command": command}, indent=2,
                                                ensure_ascii=False))
    return finish(stages, sizes, command, out, args.results)


def finish(stages: list[dict], sizes: dict, command: str, out: Path, results: Path | None) -> dict:
    runs = out / "runs"
    metrics = json.loads((runs / "eval" / "metrics.json").read_text())
    m = measure(runs / "vqgan" / "checkpoints" / "best.ckpt", runs / "transformer" / "checkpoints" / "best.ckpt")
    text = report(stages, m, argparse.Namespace(**sizes), out, command)
    if "--report-only" in sys.argv:
        text = text.replace(f"Command: `{command}`", f"Command: `{command}` (FLOPs and this page: the same "
                            "with `--report-only`, on its outputs)")
    (out / "RESULTS.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"stages": stages, "flops": m, "eval": metrics}, indent=2,
                                                 ensure_ascii=False, default=str))
    if results:
        results.write_text(text)
    print(text)
    return {"stages": stages, "flops": m, "eval": metrics, "samples": sorted((out / "samples").glob("*.png"))}


if __name__ == "__main__":
    main()
