"""t2i-sweep-report: one table and one plot for a Hydra multirun folder (a grid or an Optuna sweep).

    t2i-sweep-report outputs/shapes_transformer/multiruns/<id>
    t2i-sweep-report <sweep> --metric val/image_loss --out report

Every job folder (``<sweep>/<n>/``) contributes its overrides (those that vary across the jobs become
columns; the shared ones are listed once), the final metrics ``t2i-train`` or ``t2i-demo`` wrote to
``metrics.json`` and its wall time.
A job without ``metrics.json`` (failed, killed, still running) is listed with its status, not dropped.
Writes ``<out>.md`` and ``<out>.png`` (default ``<sweep>/report``) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import yaml

HIGHER_IS_BETTER = ("psnr", "ssim", "acc", "recall", "r@", "is_mean", "clip_score", "accuracy", "oracle")


def higher_is_better(metric: str) -> bool:
    return any(word in metric.lower() for word in HIGHER_IS_BETTER)


def parse_override(text: str) -> tuple[str, str]:
    key, _, value = text.partition("=")
    return key.lstrip("+~"), value


def read_job(folder: Path) -> dict:
    overrides_file = folder / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else []
    job = {"job": folder.name, "overrides": dict(parse_override(o) for o in overrides or []),
           "metrics": {}, "status": "no metrics.json (failed, killed or running)"}
    summary = folder / "metrics.json"
    if summary.exists():
        try:
            data = json.loads(summary.read_text())
        except json.JSONDecodeError as exc:
            job["status"] = f"unreadable metrics.json ({exc})"
            return job
        job["metrics"] = data.get("metrics", {})
        job["status"] = data.get("status", "finished")
        job["optimized_metric"] = data.get("optimized_metric")
        job["wall_seconds"] = data.get("wall_seconds")
    return job


def read_sweep(folder: Path) -> list[dict]:
    jobs = [read_job(d) for d in folder.iterdir() if d.is_dir() and (d / ".hydra").is_dir()]
    return sorted(jobs, key=lambda j: (not j["job"].isdigit(), int(j["job"]) if j["job"].isdigit() else j["job"]))


def choose_metrics(jobs: list[dict], metric: str | None, extra: list[str] | None) -> list[str]:
    seen = sorted({k for j in jobs for k in j["metrics"]})
    first = metric or next((j.get("optimized_metric") for j in jobs if j.get("optimized_metric")), None)
    if extra:
        rest = extra
    else:  # the headline metrics: losses and quality numbers of val and test, not per-step train values
        rest = [k for k in seen if k.startswith(("val/", "test/")) and "step" not in k][:8]
    out = [first] if first else []
    return out + [m for m in rest if m != first]


def fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def table(jobs: list[dict], metrics: list[str], best_job: str | None) -> tuple[str, list[str], dict]:
    keys = sorted({k for j in jobs for k in j["overrides"]})
    varying = [k for k in keys if len({j["overrides"].get(k) for j in jobs}) > 1]
    shared = {k: jobs[0]["overrides"].get(k) for k in keys if k not in varying}
    timed = any(isinstance(j.get("wall_seconds"), (int, float)) for j in jobs)
    head = ["job", *varying, *metrics, *(["time (s)"] * timed), "status"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for j in jobs:
        mark = " ★" if j["job"] == best_job else ""
        cells = [j["job"] + mark, *(str(j["overrides"].get(k, "")) for k in varying),
                 *(fmt(j["metrics"].get(m)) for m in metrics),
                 *([fmt(j.get("wall_seconds")) if j.get("wall_seconds") is None else f"{j['wall_seconds']:.0f}"]
                   * timed), j["status"]]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows), varying, shared


def best(jobs: list[dict], metric: str | None) -> str | None:
    scored = [j for j in jobs if metric and isinstance(j["metrics"].get(metric), (int, float))
              and not math.isnan(j["metrics"][metric])]
    if not scored:
        return None
    pick = max if higher_is_better(metric) else min
    return pick(scored, key=lambda j: j["metrics"][metric])["job"]


def plot(jobs: list[dict], metric: str, varying: list[str], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [j for j in jobs if isinstance(j["metrics"].get(metric), (int, float))]
    if not scored:
        return False
    labels = [", ".join(f"{k.split('.')[-1]}={j['overrides'].get(k)}" for k in varying) or j["job"] for j in scored]
    values = [j["metrics"][metric] for j in scored]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(scored) + 2), 3.6), dpi=120)
    bars = ax.bar(range(len(scored)), values, color="#4C72B0")
    pick = best(jobs, metric)
    for bar, j in zip(bars, scored):
        if j["job"] == pick:
            bar.set_color("#DD8452")
    ax.set_xticks(range(len(scored)), [f"{j['job']}\n{lab}" for j, lab in zip(scored, labels)],
                  fontsize=7, rotation=30 if len(scored) > 4 else 0, ha="right" if len(scored) > 4 else "center")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per run ({'higher' if higher_is_better(metric) else 'lower'} is better; best in orange)",
                 fontsize=9)
    for bar, v in zip(bars, values):
        ax.annotate(f"{v:.4g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                    va="bottom", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def report(sweep: Path, metric: str | None = None, metrics: list[str] | None = None,
           out: Path | None = None) -> dict:
    if not sweep.is_dir():
        raise SystemExit(f"error: {sweep} is not a folder (give a multirun folder, e.g. outputs/<task>/multiruns/<id>)")
    jobs = read_sweep(sweep)
    if not jobs:
        raise SystemExit(f"error: {sweep} holds no Hydra job folders (<n>/.hydra); is it a multirun folder?")
    cols = choose_metrics(jobs, metric, metrics)
    headline = cols[0] if cols else None
    best_job = best(jobs, headline)
    text, varying, shared = table(jobs, cols, best_job)
    out = out or sweep / "report"
    lines = [f"# Sweep {sweep}", "", f"{len(jobs)} runs, {sum(bool(j['metrics']) for j in jobs)} with metrics."]
    if shared:
        lines += ["", "Shared overrides: " + " ".join(f"`{k}={v}`" for k, v in shared.items())]
    optuna = sweep / "optimization_results.yaml"
    if optuna.exists():
        res = yaml.safe_load(optuna.read_text()) or {}
        lines += ["", f"Optuna best: {res.get('best_value')} with "
                  + " ".join(f"`{k}={v}`" for k, v in (res.get("best_params") or {}).items())]
    if best_job is not None:
        lines += ["", f"Best by `{headline}` ({'max' if higher_is_better(headline) else 'min'}): job {best_job} ★"]
    lines += ["", text, ""]
    png = out.with_suffix(".png")
    if headline and plot(jobs, headline, varying, png):
        lines += [f"![{headline}]({png.name})", ""]
    md = out.with_suffix(".md")
    md.write_text("\n".join(lines))
    print(text)
    print(f"\nwrote {md}" + (f" and {png}" if png.exists() else ""))
    return {"jobs": jobs, "columns": cols, "best": best_job, "markdown": md, "plot": png if png.exists() else None}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="t2i-sweep-report", description=__doc__.split("\n")[0])
    ap.add_argument("sweep", type=Path, help="a multirun folder: outputs/<task>/multiruns/<id>")
    ap.add_argument("--metric", help="the headline metric (default: the runs' optimized_metric)")
    ap.add_argument("--metrics", nargs="*", help="further metric columns (default: the val/ and test/ metrics)")
    ap.add_argument("--out", type=Path, help="output stem (default: <sweep>/report -> report.md, report.png)")
    args = ap.parse_args(argv)
    report(args.sweep, args.metric, args.metrics, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
