"""Tokenizer speed: our VQGAN training step and encoding vs taming-transformers on the same architecture.

Training step (generator step + discriminator step, LPIPS on), images/s and peak memory:
  * ours: ``VQGANModule``'s model + loss + optimizers, the step logic of
    ``t2i.lit.vqgan.VQGANModule.training_step`` without Lightning (generator forward, loss with the
    adaptive GAN weight, backward, grad-norm clipping, step; then the discriminator);
  * taming: ``taming.models.vqgan.VQModel`` + ``VQLPIPSWithDiscriminator`` driven the way Lightning 1.x
    drove it (one ``training_step`` per optimizer, each re-running the autoencoder forward, with the other
    optimizer's parameters frozen as ``toggle_optimizer`` did).
Both use the same LPIPS network with the same random VGG16 weights (taming's ``LPIPS`` class is replaced,
in the taming worker only, by a module built like ours) -- same compute, no download.
Phases: ``gan`` (discriminator active) and ``pre`` (before ``disc_start``: we skip the discriminator,
taming runs it and multiplies by 0).

Encoding: ``VQGAN.encode`` images/s (what ``t2i-tokenize`` calls) and taming's ``VQModel.encode``.

Each side runs in its own subprocess (so ``ru_maxrss`` is that side's peak); the two are called alternately,
one step at a time (ABBA order), on the same seeded batch; medians are reported.

    python experiments/tokenizer_speed/bench.py --out experiments/tokenizer_speed/RESULTS.md
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

TRAIN_ARCH = dict(ch=64, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[16], z_channels=64, embed_dim=64,
                  n_embed=512, resolution=64, dropout=0.0)
ENCODE_ARCHS = {
    "shapes": dict(ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[], z_channels=32, embed_dim=32,
                   n_embed=128, resolution=32, dropout=0.0),
    "f16": dict(ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16], z_channels=256,
                embed_dim=256, n_embed=16384, resolution=256, dropout=0.0),
}
DISC = dict(layers=3, ndf=64, weight=0.8)
NEVER = 10**9


# -- helpers (worker side) ----------------------------------------------------------------------
def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def batch(b: int, size: int) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1


def import_taming_vqgan():
    """taming.models.vqgan imports Lightning 1.x's ``utilities.distributed``; stub it for the import."""
    name = "pytorch_lightning.utilities.distributed"
    try:
        importlib.import_module(name)
    except ImportError:
        from pytorch_lightning.utilities import rank_zero_only

        stub = types.ModuleType(name)
        stub.rank_zero_only = rank_zero_only
        sys.modules[name] = stub
    return importlib.import_module("taming.models.vqgan")


def taming_ddconfig(arch: dict) -> dict:
    dd = {k: v for k, v in arch.items() if k not in ("embed_dim", "n_embed")}
    return dict(dd, double_z=False, in_channels=3, out_ch=3)


# -- training step ------------------------------------------------------------------------------
def build_ours(gan: bool, vgg: str, lr: float):
    from t2i.lit.vqgan import VQGANModule

    module = VQGANModule(
        model=dict(TRAIN_ARCH, quantizer={"kind": "vq", "beta": 0.25, "legacy": True}),
        loss=dict(disc_start=0 if gan else NEVER, perceptual_weight=1.0, vgg_path=vgg, disc_layers=DISC["layers"],
                  disc_ndf=DISC["ndf"], disc_weight=DISC["weight"]),
        lr=lr, grad_clip=1.0)
    module.train()
    (opt_g, opt_d), (sched_g, sched_d) = module.configure_optimizers()
    model, loss = module.model, module.loss
    clip = torch.nn.utils.clip_grad_norm_

    def params(opt):
        return [p for g in opt.param_groups for p in g["params"]]

    def step(x: torch.Tensor, i: int) -> None:  # = VQGANModule.training_step, without Lightning
        recon, qloss, _ = model(x)
        g_loss, _ = loss.generator_loss(x, recon, qloss, model.last_layer, i)
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        clip(params(opt_g), 1.0)
        opt_g.step()
        sched_g.step()
        if loss.gan_active(i):
            d_loss, _ = loss.discriminator_loss(x, recon.detach(), i)
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            clip(params(opt_d), 1.0)
            opt_d.step()
            sched_d.step()

    return step


class TamingShapedLPIPS(torch.nn.Module):
    """Our LPIPS (same network, same random VGG file) with taming's output shape [B, 1, 1, 1]."""

    def __init__(self, vgg: str):
        super().__init__()
        from t2i.losses.perceptual import LPIPS

        self.inner = LPIPS(vgg)

    def forward(self, x, y):
        return self.inner(x, y).view(-1, 1, 1, 1)


def build_taming(gan: bool, vgg: str, lr: float):
    vqgan = import_taming_vqgan()
    import taming.modules.losses.vqperceptual as vqp

    vqp.LPIPS = lambda: TamingShapedLPIPS(vgg)  # no download; identical perceptual network on both sides
    lossconfig = {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                  "params": {"disc_start": 0 if gan else NEVER, "disc_weight": DISC["weight"], "codebook_weight": 1.0,
                             "disc_num_layers": DISC["layers"], "disc_ndf": DISC["ndf"]}}
    model = vqgan.VQModel(ddconfig=taming_ddconfig(TRAIN_ARCH), lossconfig=lossconfig,
                          n_embed=TRAIN_ARCH["n_embed"], embed_dim=TRAIN_ARCH["embed_dim"])
    model.learning_rate = lr
    model.train()
    opts, _ = model.configure_optimizers()
    groups = [[p for g in o.param_groups for p in g["params"]] for o in opts]

    def step(x: torch.Tensor, i: int) -> None:  # Lightning 1.x automatic optimization, two optimizers
        for idx, opt in enumerate(opts):
            for j, ps in enumerate(groups):  # toggle_optimizer: freeze the other optimizer's parameters
                for p in ps:
                    p.requires_grad_(j == idx)
            xrec, qloss = model(x)
            loss, _ = model.loss(qloss, x, xrec, idx, i, last_layer=model.get_last_layer(), split="train")
            opt.zero_grad()
            loss.backward()
            opt.step()
        for ps in groups:
            for p in ps:
                p.requires_grad_(True)

    return step


def make_train(side: str, phase: str, b: int, vgg: str):
    """One training step per call; ``step(x, i)`` with the batch built here."""
    torch.manual_seed(0)
    step = (build_ours if side == "ours" else build_taming)(phase == "gan", vgg, 4.5e-6 * b)
    x = batch(b, TRAIN_ARCH["resolution"])
    counter = iter(range(10**9))
    return lambda: step(x, next(counter))


# -- encoding -----------------------------------------------------------------------------------
def make_encode(side: str, arch_name: str, b: int):
    """One encoding batch (no autograd) per call."""
    torch.manual_seed(0)
    arch = ENCODE_ARCHS[arch_name]
    if side == "ours":
        from t2i.models.vqgan import VQGAN

        model = VQGAN(**arch, quantizer={"kind": "vq", "legacy": True}).eval()
        encode = model.encode
    else:
        vqgan = import_taming_vqgan()
        model = vqgan.VQModel(ddconfig=taming_ddconfig(arch), n_embed=arch["n_embed"], embed_dim=arch["embed_dim"],
                              lossconfig={"target": "taming.modules.losses.vqperceptual.DummyLoss"}).eval()

        def encode(x):
            return model.encode(x)[2][2]

    x = batch(b, arch["resolution"])

    def run():
        with torch.inference_mode():
            encode(x)

    return run


def serve(spec: dict) -> None:
    """Worker process: build one side, then answer ``step`` (time one call) / ``stats`` / ``quit`` on stdin.
    Replies are single lines starting with ``@@`` (the peer code prints its own messages)."""
    kind = spec.pop("kind")
    # From random weights, gradients and Adam moments go subnormal for a while; on x86 CPUs every op on
    # subnormals is slow, and how long that lasts differs between phases and runs. Flush them on both sides
    # so the timings measure the implementations (GPUs do not have this cost).
    torch.set_flush_denormal(True)
    fn = make_train(**spec) if kind == "train" else make_encode(**spec)
    print("@@ready", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "step":
            w, c = time.perf_counter(), time.process_time()
            fn()
            print("@@" + json.dumps({"wall": time.perf_counter() - w, "cpu": time.process_time() - c}), flush=True)
        elif cmd == "stats":
            print("@@" + json.dumps({"peak_rss_mib": peak_rss_mib(), "rss_mib": rss_mib()}), flush=True)
        else:
            return


# -- driver -------------------------------------------------------------------------------------
class Worker:
    def __init__(self, spec: dict):
        self.spec = spec
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", json.dumps(spec)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        self.reply()

    def reply(self):
        for line in self.proc.stdout:
            if line.startswith("@@"):
                body = line[2:].strip()
                return None if body == "ready" else json.loads(body)
        raise RuntimeError(f"worker {self.spec} exited with {self.proc.wait()}")

    def ask(self, cmd: str):
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.reply()

    def close(self):
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        self.proc.wait()


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def duel(spec: dict, warmup: int, steps: int, per_call: int) -> dict[str, dict]:
    """Ours and taming in two processes built one after the other, then called alternately (ABBA order),
    so that load from anything else on the machine hits both sides alike. Medians per call."""
    workers = {side: Worker(dict(spec, side=side)) for side in ("ours", "taming")}
    times: dict[str, list[dict]] = {side: [] for side in workers}
    try:
        for i in range(warmup + steps):
            order = ("ours", "taming") if i % 2 == 0 else ("taming", "ours")
            for side in order:
                t = workers[side].ask("step")
                if i >= warmup:
                    times[side].append(t)
        out = {}
        for side, w in workers.items():
            wall, cpu = median([t["wall"] for t in times[side]]), median([t["cpu"] for t in times[side]])
            out[side] = dict(w.ask("stats"), wall_s=wall, cpu_s=cpu, calls_per_s=1 / wall, images_per_s=per_call / wall)
            print(f"{spec} {side}: {out[side]}", flush=True)
        return out
    finally:
        for w in workers.values():
            w.close()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--encode-batches", type=int, default=10, help="timed batches of 64 (Shapes config)")
    ap.add_argument("--f16-batch", type=int, default=8)
    ap.add_argument("--f16-batches", type=int, default=3)
    ap.add_argument("--out", type=Path, help="write the Markdown report here")
    a = ap.parse_args()
    if a.serve:
        serve(json.loads(a.serve))
        return

    import torchvision

    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        vgg = str(Path(tmp) / "vgg16-random.pth")
        torch.manual_seed(0)
        feats = torchvision.models.vgg16(weights=None).features.state_dict()
        torch.save({f"features.{k}": v for k, v in feats.items()}, vgg)
        train = {phase: duel(dict(kind="train", phase=phase, b=a.batch, vgg=vgg), a.warmup, a.steps, a.batch)
                 for phase in ("gan", "pre")}
        load.append(os.getloadavg()[0])
    enc = {"shapes": duel(dict(kind="encode", arch_name="shapes", b=64), 1, a.encode_batches, 64),
           "f16": duel(dict(kind="encode", arch_name="f16", b=a.f16_batch), 1, a.f16_batches, a.f16_batch)}
    load.append(os.getloadavg()[0])
    report = render(a, train, enc, load)
    print(report)
    if a.out:
        a.out.write_text(report)


def render(a, train: dict, enc: dict, load: list[float]) -> str:
    cmd = "python experiments/tokenizer_speed/bench.py --out experiments/tokenizer_speed/RESULTS.md"
    defaults = dict(batch=8, steps=8, warmup=3, encode_batches=10, f16_batch=8, f16_batches=3)
    extra = " ".join(f"--{k.replace('_', '-')} {getattr(a, k)}" for k, v in defaults.items() if getattr(a, k) != v)
    arch = ", ".join(f"{k}={v}" for k, v in TRAIN_ARCH.items() if k != "dropout")
    lines = [
        "# Tokenizer speed: t2i VQGAN vs taming-transformers",
        "",
        f"Command: `{cmd}{' ' + extra if extra else ''}`",
        "",
        f"Machine: CPU only ({cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads per process, Python {platform.python_version()}); no GPU was available "
        f"for this run. 1-minute load average at start / after training / at end: "
        f"{' / '.join(f'{x:.1f}' for x in load)}.",
        "",
        "Method: each side runs in its own process (so peak RSS = that side's `ru_maxrss`, including imports "
        "and weights); the two processes are called alternately, one step at a time, in ABBA order, so "
        "anything else running on the machine slows both alike; times are medians over the timed calls. "
        "'CPU s' is the process CPU time per call (all threads). Both workers flush subnormal floats to zero "
        "(`torch.set_flush_denormal(True)`): from random weights, gradients and Adam moments go subnormal for a "
        "while and x86 CPUs are very slow on them, which otherwise swamps the comparison (without it the training "
        "steps were 3-4x slower for a varying number of steps, and the random-weight Shapes encoder ~14x slower).",
        "",
        "## VQGAN training step (generator step + discriminator step, LPIPS on)",
        "",
        f"Architecture (both sides): {arch}; PatchGAN {DISC['layers']} layers, ndf {DISC['ndf']}; "
        f"batch {a.batch} of {TRAIN_ARCH['resolution']} px; {a.steps} timed step(s) after {a.warmup} warm-up step(s). "
        "Same random-weight LPIPS (VGG16) on both sides.",
        "",
        "| phase | side | steps/s | images/s | CPU s/step | peak RSS (MiB) | speed ours/taming | peak RSS ours/taming |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for phase, label in (("gan", "GAN active"), ("pre", "before disc_start")):
        o, t = train[phase]["ours"], train[phase]["taming"]
        for side, r in (("ours", o), ("taming", t)):
            ratio = (f"**{o['images_per_s'] / t['images_per_s']:.2f}x**",
                     f"**{o['peak_rss_mib'] / t['peak_rss_mib']:.2f}x**") if side == "ours" else ("", "")
            lines.append(f"| {label} | {side} | {r['calls_per_s']:.3f} | {r['images_per_s']:.2f} | {r['cpu_s']:.1f} | "
                         f"{r['peak_rss_mib']:.0f} | {ratio[0]} | {ratio[1]} |")
    lines += [
        "",
        "## Encoding (`VQGAN.encode`, what `t2i-tokenize` runs) vs taming `VQModel.encode`",
        "",
        "| config | batch | side | images/s | peak RSS (MiB) | speed ours/taming |",
        "|---|---|---|---|---|---|",
    ]
    for name, b, label in (("shapes", 64, "Shapes demo (32 px, ch 32, ch_mult [1,2,2], 128 codes)"),
                           ("f16", a.f16_batch, "f16-16384 (256 px, ch 128, ch_mult [1,1,2,2,4])")):
        o, t = enc[name]["ours"], enc[name]["taming"]
        lines.append(f"| {label} | {b} | ours | {o['images_per_s']:.3g} | {o['peak_rss_mib']:.0f} | "
                     f"**{o['images_per_s'] / t['images_per_s']:.2f}x** |")
        lines.append(f"| {label} | {b} | taming | {t['images_per_s']:.3g} | {t['peak_rss_mib']:.0f} | |")
    lines += [
        "",
        "## Where the differences come from",
        "",
        "* Taming (Lightning 1.x, two optimizers) calls `training_step` once per optimizer, so the autoencoder "
        "forward runs twice per batch; ours runs it once and gives the discriminator `recon.detach()`.",
        "* Before `disc_start` taming still runs the discriminator on the generator side, computes the adaptive "
        "weight (two `autograd.grad` calls) and runs/steps the discriminator, all multiplied by 0; ours skips "
        "all of it. With the GAN active, both do the same work apart from the extra forward.",
        "* Ours clips gradient norms of both optimizers (taming does not) and, unlike Lightning 1.x's "
        "`toggle_optimizer`, leaves the discriminator's `requires_grad` on during the generator backward; "
        "freezing it there measured within 0.5% of the current step at this size (the PatchGAN is small "
        "next to LPIPS and the autoencoder), so it is not done.",
        "* Attention: ours uses `scaled_dot_product_attention`, taming `bmm` + softmax; the quantizer's "
        "nearest-code search is the same distance computed in a different order.",
        "* Peak RSS includes the interpreter, torch and Lightning imports (~1.2 GiB for either side at these "
        "sizes, hence identical peaks for the small encoder) and the weights.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
