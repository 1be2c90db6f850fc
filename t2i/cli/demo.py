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
import math
import shutil
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from t2i.cli import chain
from t2i.cli.chain import Stage, StageError, run_stage  # noqa: F401  (the demo's stages; experiments run them)
from t2i.cli.common import clear_errors
from t2i.errors import ConfigError

ATTRIBUTES = ("color", "shape", "position", "size", "all")


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
    ckpt = Path(summary.get("best_checkpoint") or run / "checkpoints" / "last.ckpt")
    if (run / "checkpoints" / ckpt.name).exists():  # through <run>, also when <run> is linked from another demo
        ckpt = run / "checkpoints" / ckpt.name
    if not ckpt.exists():
        raise StageError(f"{run}: checkpoint {ckpt} is missing; rerun with force=true")
    return str(ckpt)


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
    if name == "data":
        meta = json.loads((data_folder(out) / "meta.json").read_text())
        return "/".join(str(meta["counts"][s]) for s in ("train", "val", "test", "compositional")) + \
            " train/val/test/compositional images"
    res = json.loads((out / name / "metrics.json").read_text())["summary"]
    return ", ".join(f"{k} {v:.3f}" for k, v in res.items() if isinstance(v, (int, float)))


def build_data(overrides: list[str]) -> None:
    """The data stage: the Shapes benchmark and its text tokenizer, written once, before the stages that read
    it start side by side (the data section every training stage composes, so they find it built)."""
    from hydra import compose

    from t2i.data.datamodule import prepare_shapes

    cfg = compose(config_name="train", overrides=["experiment=shapes_clip", *overrides])
    prepare_shapes(cfg.data.shapes, cfg.data.tokenizer)


def data_folder(out: Path) -> Path:
    found = sorted((out / "data").glob("shapes_*/meta.json"))
    return found[0].parent if found else out / "data"


def settings(node) -> list[str]:
    """A stage's ``set`` mapping (what a sweeper sets: ``+transformer.set.model.lr=1e-3``) as the dotted
    overrides of that stage's own command, e.g. ``['model.lr=0.001']``."""
    flat: dict[str, object] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = value

    walk("", OmegaConf.to_container(node, resolve=True) if node else {})
    return [f"{k}={override_value(v)}" for k, v in flat.items()]


def override_value(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(override_value(x) for x in v) + "]"
    return str(v)


def ddp(processes: int) -> list[str]:
    """t2i-train overrides for data parallel over ``processes`` CPU processes (gloo); none for one."""
    if processes <= 1:
        return []
    return ["trainer=ddp", "trainer.accelerator=cpu", f"trainer.devices={processes}", "trainer.sync_batchnorm=false"]


def stages(cfg: DictConfig, out: Path) -> list:
    """The stages in order, each ``(name, deps, make)``: ``make()`` builds the :class:`Stage` once its
    dependencies are done (checkpoint arguments are read from their outputs)."""
    data = [f"paths.data_dir={out / 'data'}", *shapes_args(cfg)]
    vq_n = cfg.vqgan.get("n_train")  # the VQGAN's own, smaller copy: the first vq_n training images
    vq_data = [a if not a.startswith("data.shapes.n_train=") else f"data.shapes.n_train={vq_n}" for a in data] \
        + [f"data.shapes.output={out / 'data' / 'vqgan_shapes'}"] if vq_n and int(vq_n) != int(cfg.shapes.n_train) \
        else data
    common = [f"logger={cfg.stage_logger}", "trainer.enable_progress_bar=true"]
    e, r = cfg.eval, cfg.reconstruction
    tp, ep = int(cfg.transformer.get("processes", 1)), int(e.get("processes", 1))
    evaluate, head = ("torch.distributed.run", ["--standalone", f"--nproc_per_node={ep}", "-m", "t2i.cli.evaluate"]) \
        if ep > 1 else ("t2i.cli.evaluate", [])
    splits = "[" + ",".join(e.get("splits", ["test", "compositional"])) + "]"
    return [
        ("data", (), lambda: Stage("data", "", [*data, *(a for a in vq_data if a not in data)], data_folder(out) / "meta.json",
                                   folders=("data",), call=lambda: [build_data(d) for d in (data, vq_data)])),
        ("vqgan", ("data",), lambda: Stage("vqgan", "t2i.cli.train", [
            "experiment=shapes_vqgan", *vq_data, *common, f"trainer.max_epochs={cfg.vqgan.max_epochs}",
            "test=false", f"hydra.run.dir={out / 'vqgan'}", *settings(cfg.vqgan.get('set')), *cfg.vqgan.extra],
            train_done(out / "vqgan"), folders=("vqgan",))),
        ("clip", ("data",), lambda: Stage("clip", "t2i.cli.train", [
            "experiment=shapes_clip", *data, *common, f"trainer.max_epochs={cfg.clip.max_epochs}", "test=false",
            f"hydra.run.dir={out / 'clip'}", *settings(cfg.clip.get('set')), *cfg.clip.extra],
            train_done(out / "clip"), folders=("clip",))),
        ("tokenize", ("vqgan",), lambda: Stage("tokenize", "t2i.cli.tokenize", [
            f"tokenizer_ckpt={best_checkpoint(out / 'vqgan')}", "data=shapes", *data, f"output={out / 'codes'}",
            "overwrite=true", f"hydra.run.dir={out / 'tokenize'}"], out / "codes" / "manifest.json",
            folders=("tokenize", "codes"))),
        ("reconstruction", ("vqgan",), lambda: Stage("reconstruction", "t2i.cli.evaluate", [
            "eval=reconstruction", f"tokenizer_ckpt={best_checkpoint(out / 'vqgan')}",
            f"eval.image_size={cfg.image_size}", f"eval.num_captions={r.num_images}",
            f"eval.shapes_split={r.get('split', 'test')}", "metrics.extractor=null", "metrics.lpips=false",
            "progress=false", f"output={out / 'reconstruction'}", f"hydra.run.dir={out / 'reconstruction'}"],
            out / "reconstruction" / "metrics.json", folders=("reconstruction",))),
        ("transformer", ("tokenize",), lambda: Stage("transformer", "t2i.cli.train", [
            "experiment=shapes_transformer", f"data.codes={out / 'codes'}", f"paths.data_dir={out / 'data'}",
            *common, f"trainer.max_epochs={cfg.transformer.max_epochs}", "test=false", *ddp(tp),
            f"hydra.run.dir={out / 'transformer'}", *settings(cfg.transformer.get('set')), *cfg.transformer.extra],
            train_done(out / "transformer"), folders=("transformer",), processes=tp)),
        ("eval", ("transformer", "clip"), lambda: Stage("eval", evaluate, [
            *head, "eval=shapes", f"ckpt={best_checkpoint(out / 'transformer')}",
            f"clip.ckpt={best_checkpoint(out / 'clip')}", f"eval.splits={splits}",
            f"eval.num_captions={e.num_captions}", f"eval.num_candidates={e.num_candidates}",
            f"eval.lang={cfg.lang}", f"sample.top_k={e.top_k}", "metrics.extractor=null",
            "metrics.inception_score=false", "progress=false", f"output={out / 'eval'}",
            f"hydra.run.dir={out / 'eval'}", *settings(e.get("set")), *e.extra], out / "eval" / "metrics.json",
            folders=("eval",), processes=ep)),
    ]


def done_in(stage: Stage, out: Path, root: Path) -> Path:
    """Where ``stage``'s finished-marker lies in the demo folder ``root``."""
    return data_folder(root) / "meta.json" if stage.name == "data" else root / stage.done.relative_to(out)


def run_chain(cfg: DictConfig, out: Path) -> tuple[dict, dict, float]:
    """Run (or reuse) every selected stage of the demo (see :func:`t2i.cli.chain.run_chain`)."""
    return chain.run_chain(stages(cfg, out), cfg, out, stage_status, done_in)


def wilson(p: float, n: int, z: float = 1.96) -> list[float]:
    """The 95% Wilson score interval of an accuracy ``p`` measured on ``n`` captions."""
    if n <= 0:
        return [0.0, 1.0]
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), \
        z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


ORDER = ("data", "vqgan", "clip", "tokenize", "reconstruction", "transformer", "eval")
LEGACY = {("test", "first"): "acc_first", ("test", "chosen"): "acc_rerank",  # the headline keys of metrics.json
          ("compositional", "first"): "acc_compositional_first",
          ("compositional", "chosen"): "acc_compositional_rerank"}


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def collect(out: Path, records: dict, wall: float, optimized: str | None = None) -> dict:
    """The demo's ``metrics.json``: the headline numbers (``acc_*``, ``tokenizer_psnr``), each accuracy's 95%
    interval, and ``metrics`` (``<split>/acc_first`` ...) in the form ``t2i-sweep-report`` tabulates."""
    vq = (read_json(train_done(out / "vqgan")) or {}).get("metrics", {})
    ev = read_json(out / "eval" / "metrics.json") or {"splits": {}}
    rec = read_json(out / "reconstruction" / "metrics.json") or {"summary": {}, "splits": {}}
    result: dict = {"tokenizer_psnr": vq.get("val/psnr"), "tokenizer_ssim": vq.get("val/ssim"),
                    "reconstruction_psnr": rec["summary"].get("psnr"),
                    "reconstruction_oracle": rec["summary"].get("oracle_all")}
    flat = {"tokenizer/psnr": vq.get("val/psnr"), "reconstruction/psnr": rec["summary"].get("psnr"),
            "reconstruction/oracle_all": rec["summary"].get("oracle_all")}
    ci, per_attribute = {}, {}
    for split, m in ev["splits"].items():
        n = int(m.get("n") or m.get("acc_by", {}).get("n") or 0)
        per_attribute[split] = {which: m[f"acc_{which}"] for which in ("first", "chosen")}
        for which, word in (("first", "first"), ("chosen", "rerank")):
            value = m[f"acc_{which}"]["all"]
            key = LEGACY.get((split, which), f"acc_{split}_{word}")
            result[key] = value
            ci[key] = wilson(value, n)
            flat[f"{split}/acc_{word}"] = value
        if "best_of_n" in m.get("acc_by", {}):
            flat[f"{split}/acc_best_of_n"] = m["acc_by"]["best_of_n"]
        result.setdefault("captions_per_split", n)
    test = ev["splits"].get("test", {})
    result |= {"fd_clip": test.get("fd_clip"), "clip_score": test.get("clip_score"), "ci95": ci,
               "wall_seconds": round(wall, 1),
               "stage_seconds": {k: records[k].get("seconds") for k in ORDER if k in records},
               "reused": {k: r["reused_from"] for k, r in records.items() if r.get("reused_from")},
               "per_attribute": per_attribute,
               "status": "finished", "optimized_metric": optimized,
               "metrics": {k: v for k, v in flat.items() if v is not None}}
    return result


def write_report(out: Path, cfg: DictConfig, metrics: dict, status: dict) -> Path:
    n = metrics.get("captions_per_split", cfg.eval.num_captions)
    reused = metrics["reused"]
    lines = ["# t2i demo on Shapes", "",
             f"{cfg.image_size} px, {cfg.shapes.n_train} training images"
             + (f" (the VQGAN: the first {cfg.vqgan.n_train})" if cfg.vqgan.get("n_train") else "")
             + f", captions in {cfg.lang}; "
             f"{n} captions per split, {cfg.eval.num_candidates} candidates each "
             f"(top-k {cfg.eval.top_k}), reranked by the demo's CLIP. Wall time {metrics['wall_seconds']:.0f} s"
             + (f" (stages reused from {sorted(set(reused.values()))[0]}: {', '.join(reused)})." if reused else "."),
             "", "| stage | time | key metrics |", "|---|---:|---|"]
    for name, secs in metrics["stage_seconds"].items():
        lines.append(f"| {name} | {secs:.0f} s{' (reused)' * (name in reused)} | {status.get(name, '')} |")
    lines += ["", "## Oracle accuracy of generated samples", "",
              "Fraction of samples whose attribute the rule-based oracle reads back as the caption states; "
              "*all* needs all four, with its 95% interval (Wilson). *first*: the first sample drawn; "
              "*reranked*: the one CLIP picks.", "",
              "| split | sample | " + " | ".join(ATTRIBUTES) + " | 95% interval of all |",
              "|---|---|" + "---:|" * (len(ATTRIBUTES) + 1)]
    for split, both in metrics["per_attribute"].items():
        for which, label in (("first", "first"), ("chosen", "reranked")):
            key = LEGACY.get((split, which), f"acc_{split}_{'first' if which == 'first' else 'rerank'}")
            lo, hi = metrics["ci95"].get(key, [float("nan")] * 2)
            lines.append(f"| {split} | {label} | " + " | ".join(f"{both[which].get(a, float('nan')):.3f}"
                                                                  for a in ATTRIBUTES) + f" | {lo:.3f}–{hi:.3f} |")
    fmt = lambda v: "—" if v is None else f"{v:.4g}"  # noqa: E731
    lines += ["", f"Tokenizer: val PSNR {fmt(metrics['tokenizer_psnr'])} dB, SSIM {fmt(metrics['tokenizer_ssim'])}; "
              f"{cfg.reconstruction.get('split', 'test')}-split reconstruction PSNR "
              f"{fmt(metrics['reconstruction_psnr'])} dB, read right by the oracle: "
              f"{fmt(metrics['reconstruction_oracle'])}.",
              f"FD-CLIP {fmt(metrics['fd_clip'])}, CLIPScore {fmt(metrics['clip_score'])} (the demo's own CLIP: "
              "comparable between demo runs, not with public CLIP models).", ""]
    for png in ("samples.png", "reconstructions.png"):
        if (out / png).exists():
            lines += [f"![{png[:-4]}]({png})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def output_folder(cfg: DictConfig) -> Path:
    """``output``; in a sweep (``-m``) each job's own folder, so the trials never share one."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(HydraConfig.get().runtime.output_dir).resolve()
    return Path(str(cfg.output)).expanduser().resolve()


def demo(cfg: DictConfig) -> dict:
    out = output_folder(cfg)
    out.mkdir(parents=True, exist_ok=True)
    records, status, wall = run_chain(cfg, out)
    for png, stage in (("samples.png", "eval"), ("reconstructions.png", "reconstruction")):
        if (out / stage / png).exists():
            shutil.copyfile(out / stage / png, out / png)
    metrics = collect(out, records, wall, cfg.get("optimized_metric"))
    metrics["config"] = OmegaConf.to_container(cfg, resolve=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    report = write_report(out, cfg, metrics, status)
    heads = [f"{k} {v:.3f}" for k, v in metrics["metrics"].items() if "/acc_" in k and "best_of" not in k]
    psnr = metrics["tokenizer_psnr"]
    print(f"demo: {wall:.0f} s; {', '.join(heads) or 'no evaluation'}"
          + (f"; tokenizer PSNR {psnr:.1f} dB" if psnr is not None else "") + f"; report: {report}")
    return metrics


def objective(metrics: dict, name: str | None) -> float | None:
    """The value a sweep (``hparams_search=demo_optuna``) optimises: ``metrics[name]``, e.g. ``val/acc_rerank``."""
    if not name:
        return None
    if name not in metrics["metrics"]:
        raise ConfigError(f"optimized_metric={name} is not among this demo's metrics "
                          f"({', '.join(metrics['metrics'])}); e.g. eval.splits=[val] gives val/acc_rerank")
    return float(metrics["metrics"][name])


@hydra.main(version_base="1.3", config_path="../conf", config_name="demo")
@clear_errors
def main(cfg: DictConfig) -> float | None:
    return objective(demo(cfg), cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
