"""t2i-demo: data -> VQGAN -> tokenize -> transformer -> CLIP -> generate + rerank -> evaluate, on Shapes.

Every stage is its own Hydra run (a subprocess of the same console scripts a user would type) in
``<output>/<stage>``, and hands its checkpoint to the next. A stage whose output exists is skipped
unless ``force=true``; once a stage reruns, the later ones rerun too. At the end ``<output>`` holds
``metrics.json``, ``report.md``, ``samples.png`` and ``reconstructions.png``.

The terminal gets one status line as a stage starts and one as it ends; everything a stage prints
(progress bars, Lightning / Hydra / W&B messages and warnings) goes to ``<output>/logs/<stage>.log``
(``verbose=true`` shows it on the terminal too). A failed stage prints the end of its log.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from t2i.cli.common import clear_errors
from t2i.errors import T2IError

ATTRIBUTES = ("color", "shape", "position", "size", "all")


class StageError(T2IError):
    """A stage's process failed; its log is named."""


@dataclass
class Stage:
    name: str
    module: str
    args: list[str]
    done: Path                      # exists when the stage finished


def shapes_args(cfg: DictConfig) -> list[str]:
    s = cfg.shapes
    return [f"data.image_size={cfg.image_size}", f"data.shapes.lang={cfg.lang}", f"data.shapes.n_train={s.n_train}",
            f"data.shapes.n_val={s.n_val}", f"data.shapes.n_test={s.n_test}",
            f"data.shapes.n_compositional={s.n_compositional}"]


def train_done(run: Path) -> Path:
    return run / "metrics.json"


def best_checkpoint(run: Path) -> str:
    summary = json.loads(train_done(run).read_text())
    if summary.get("status") != "finished":
        raise StageError(f"{run} did not finish ({summary.get('status')}); rerun with force=true")
    ckpt = summary.get("best_checkpoint") or str(run / "checkpoints" / "last.ckpt")
    if not Path(ckpt).exists():
        raise StageError(f"{run}: checkpoint {ckpt} is missing; rerun with force=true")
    return ckpt


def stage_log(out: Path, name: str) -> Path:
    return out / "logs" / f"{name}.log"


def run_stage(stage: Stage, out: Path, index: int, total: int, verbose: bool = False, tail: int = 25) -> float:
    """Run one stage with its output in its log file (and on the terminal when ``verbose``)."""
    cmd = [sys.executable, "-m", stage.module, *stage.args]
    log_path = stage_log(out, stage.name)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"[{index}/{total}] {stage.name}: running (log: {log_path})", flush=True)
    t0 = time.perf_counter()
    with open(log_path, "wb") as log_file:
        log_file.write(f"$ {' '.join(cmd)}\n".encode())
        log_file.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for chunk in iter(lambda: proc.stdout.read1(1 << 16), b""):
            log_file.write(chunk)
            if verbose:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
        code = proc.wait()
    if code != 0:
        lines = log_path.read_text(encoding="utf-8", errors="replace").replace("\r", "\n").splitlines()
        lines = [ln for ln in lines if ln.strip()][-tail:]
        if not verbose:
            print(f"--- the last {len(lines)} lines of {log_path} ---", *lines, "---", sep="\n", file=sys.stderr)
        raise StageError(f"stage {stage.name} failed (exit {code}); its log is {log_path} and its run folder "
                         f"{out / stage.name}")
    return time.perf_counter() - t0


def stage_status(name: str, out: Path) -> str:
    """The stage's key numbers for its one-line status."""
    if name in ("vqgan", "transformer", "clip"):
        m = json.loads(train_done(out / name).read_text())["metrics"]
        keys = {"vqgan": ("val/psnr", "val/ssim"), "transformer": ("val/image_loss", "val/loss"),
                "clip": ("val/t2i_R@1", "val/i2t_R@1")}[name]
        return ", ".join(f"{k} {m[k]:.4g}" for k in keys if k in m)
    if name == "tokenize":
        man = json.loads((out / "codes" / "manifest.json").read_text())
        return f"grid {'x'.join(map(str, man['grid']))}, {man['codebook_size']} codes"
    res = json.loads((out / name / "metrics.json").read_text())["summary"]
    return ", ".join(f"{k} {v:.3f}" for k, v in res.items() if isinstance(v, (int, float)))


def stages(cfg: DictConfig, out: Path) -> list:
    """The chain; checkpoint arguments are filled in lazily (callables) once the earlier stage is done."""
    data = [f"paths.data_dir={out / 'data'}", *shapes_args(cfg)]
    common = [f"logger={cfg.logger}", "trainer.enable_progress_bar=true"]
    e = cfg.eval
    return [
        ("vqgan", lambda: Stage("vqgan", "t2i.cli.train", [
            "experiment=shapes_vqgan", *data, *common, f"trainer.max_epochs={cfg.vqgan.max_epochs}",
            "test=false", f"hydra.run.dir={out / 'vqgan'}", *cfg.vqgan.extra], train_done(out / "vqgan"))),
        ("tokenize", lambda: Stage("tokenize", "t2i.cli.tokenize", [
            f"tokenizer_ckpt={best_checkpoint(out / 'vqgan')}", "data=shapes", *data, f"output={out / 'codes'}",
            "overwrite=true", f"hydra.run.dir={out / 'tokenize'}"], out / "codes" / "manifest.json")),
        ("transformer", lambda: Stage("transformer", "t2i.cli.train", [
            "experiment=shapes_transformer", f"data.codes={out / 'codes'}", f"paths.data_dir={out / 'data'}",
            *common, f"trainer.max_epochs={cfg.transformer.max_epochs}", "test=false",
            f"hydra.run.dir={out / 'transformer'}", *cfg.transformer.extra], train_done(out / "transformer"))),
        ("clip", lambda: Stage("clip", "t2i.cli.train", [
            "experiment=shapes_clip", *data, *common, f"trainer.max_epochs={cfg.clip.max_epochs}", "test=false",
            f"hydra.run.dir={out / 'clip'}", *cfg.clip.extra], train_done(out / "clip"))),
        ("eval", lambda: Stage("eval", "t2i.cli.evaluate", [
            "eval=shapes", f"ckpt={best_checkpoint(out / 'transformer')}",
            f"clip.ckpt={best_checkpoint(out / 'clip')}", f"eval.num_captions={e.num_captions}",
            f"eval.num_candidates={e.num_candidates}", f"eval.lang={cfg.lang}", f"sample.top_k={e.top_k}",
            "metrics.extractor=null", "metrics.inception_score=false", f"output={out / 'eval'}",
            f"hydra.run.dir={out / 'eval'}", *e.extra], out / "eval" / "metrics.json")),
        ("reconstruction", lambda: Stage("reconstruction", "t2i.cli.evaluate", [
            "eval=reconstruction", f"tokenizer_ckpt={best_checkpoint(out / 'vqgan')}",
            f"eval.image_size={cfg.image_size}", f"eval.num_captions={cfg.reconstruction.num_images}",
            "metrics.extractor=null", "metrics.lpips=false", f"output={out / 'reconstruction'}",
            f"hydra.run.dir={out / 'reconstruction'}"], out / "reconstruction" / "metrics.json")),
    ]


def collect(out: Path, times: dict) -> dict:
    vq = json.loads(train_done(out / "vqgan").read_text())["metrics"]
    ev = json.loads((out / "eval" / "metrics.json").read_text())
    rec = json.loads((out / "reconstruction" / "metrics.json").read_text())
    test, comp = ev["splits"]["test"], ev["splits"]["compositional"]
    return {
        "tokenizer_psnr": vq.get("val/psnr"),
        "tokenizer_ssim": vq.get("val/ssim"),
        "reconstruction_psnr_test": rec["summary"].get("psnr"),
        "acc_first": test["acc_first"]["all"],
        "acc_rerank": test["acc_chosen"]["all"],
        "acc_compositional_first": comp["acc_first"]["all"],
        "acc_compositional_rerank": comp["acc_chosen"]["all"],
        "fd_clip": test.get("fd_clip"),
        "clip_score": test.get("clip_score"),
        "wall_seconds": round(sum(times.values()), 1),
        "stage_seconds": {k: round(v, 1) for k, v in times.items()},
        "per_attribute": {split: {which: ev["splits"][split][f"acc_{which}"] for which in ("first", "chosen")}
                          for split in ev["splits"]},
    }


def write_report(out: Path, cfg: DictConfig, metrics: dict, status: dict) -> Path:
    lines = ["# t2i demo on Shapes", "",
             f"{cfg.image_size} px, {cfg.shapes.n_train} training images, captions in {cfg.lang}; "
             f"{cfg.eval.num_captions} captions per split, {cfg.eval.num_candidates} candidates each "
             f"(top-k {cfg.eval.top_k}), reranked by the demo's CLIP. Wall time {metrics['wall_seconds']:.0f} s.", "",
             "| stage | wall time | key metrics |", "|---|---:|---|"]
    for name, secs in metrics["stage_seconds"].items():
        lines.append(f"| {name} | {secs:.0f} s | {status.get(name, '')} |")
    lines += ["", "## Oracle accuracy of generated samples", "",
              "Fraction of samples whose attribute the rule-based oracle reads back as the caption states; "
              "*all* needs all four. *first*: the first sample drawn; *reranked*: the one CLIP picks.", "",
              "| split | sample | " + " | ".join(ATTRIBUTES) + " |", "|---|---|" + "---:|" * len(ATTRIBUTES)]
    for split, both in metrics["per_attribute"].items():
        for which, label in (("first", "first"), ("chosen", "reranked")):
            lines.append(f"| {split} | {label} | " + " | ".join(f"{both[which].get(a, float('nan')):.3f}"
                                                                  for a in ATTRIBUTES) + " |")
    fmt = lambda v: "—" if v is None else f"{v:.4g}"  # noqa: E731
    lines += ["", f"Tokenizer: val PSNR {fmt(metrics['tokenizer_psnr'])} dB, SSIM {fmt(metrics['tokenizer_ssim'])}; "
              f"test-split reconstruction PSNR {fmt(metrics['reconstruction_psnr_test'])} dB.",
              f"FD-CLIP {fmt(metrics['fd_clip'])}, CLIPScore {fmt(metrics['clip_score'])} (the demo's own CLIP: "
              "comparable between demo runs, not with public CLIP models).", "",
              "![samples](samples.png)", "", "![reconstructions](reconstructions.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def demo(cfg: DictConfig) -> dict:
    out = Path(str(cfg.output)).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    times_file = out / "stage_times.json"
    times = json.loads(times_file.read_text()) if times_file.exists() and not cfg.force else {}
    chain = stages(cfg, out)
    rerun, status = bool(cfg.force), {}
    for i, (name, make) in enumerate(chain, 1):
        stage = make()
        if not rerun and stage.done.exists() and name in times:
            status[name] = stage_status(name, out)
            print(f"[{i}/{len(chain)}] {name}: done earlier ({times[name]:.0f} s): {status[name]}", flush=True)
            continue
        rerun = True  # everything after a rerun stage reruns too
        times[name] = run_stage(stage, out, i, len(chain), verbose=bool(cfg.get("verbose", False)))
        times_file.write_text(json.dumps(times, indent=2))
        status[name] = stage_status(name, out)
        print(f"[{i}/{len(chain)}] {name}: {times[name]:.0f} s: {status[name]}", flush=True)
    shutil.copyfile(out / "eval" / "samples.png", out / "samples.png")
    shutil.copyfile(out / "reconstruction" / "reconstructions.png", out / "reconstructions.png")
    metrics = collect(out, times)
    metrics["config"] = OmegaConf.to_container(cfg, resolve=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    report = write_report(out, cfg, metrics, status)
    print(f"demo: {metrics['wall_seconds']:.0f} s; test accuracy {metrics['acc_first']:.3f} first -> "
          f"{metrics['acc_rerank']:.3f} reranked, compositional {metrics['acc_compositional_first']:.3f} -> "
          f"{metrics['acc_compositional_rerank']:.3f}; tokenizer PSNR {metrics['tokenizer_psnr']:.1f} dB; "
          f"report: {report}")
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="demo")
@clear_errors
def main(cfg: DictConfig) -> None:
    demo(cfg)


if __name__ == "__main__":
    main()
