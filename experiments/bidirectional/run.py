"""Shapes in both directions (issue 20): one transformer that generates, captions and reranks its own samples.

    python experiments/bidirectional/run.py --out outputs/bidirectional --vqgan <shapes_vqgan 32 px .ckpt> --write

Stages (each a CLI run, its log in ``<out>/logs``; a stage whose output exists is skipped): ``t2i-tokenize`` the
Shapes benchmark (32 px) with the given VQGAN -> ``t2i-train experiment=shapes_bidirectional`` (text -> image
and image -> text jointly, caption weight 0.5) -> ``t2i-train experiment=shapes_clip`` -> ``t2i-eval
eval=shapes_caption`` (beam 4; captions parsed back into attributes and compared with the true specs) ->
``t2i-eval eval=shapes`` with the CLIP and ``rerank.combine=rank_sum``: 8 candidates (top-k 4) for 500
captions per split, each candidate scored by CLIP and by the caption's likelihood given its codes, so the
first sample, every ranking and the best-of-8 ceiling are read off the same candidates.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from t2i.cli.demo import Stage, best_checkpoint, run_stage, train_done

ROOT = Path(__file__).resolve().parents[2]
READING = """Reading: one checkpoint does both. Caption-likelihood reranking (no CLIP, no decode) lifts the first
sample on both splits but less than CLIP; combined with CLIP (rank_sum / zsum) it beats CLIP alone: the two
scorers make different mistakes. All three stay well under the best-of-8 ceiling. Captioning errors on
`compositional` are shapes (colour-shape pairs never seen in training get the shape a seen pair has).
Throughput of the two scorers: `RESULTS_rerank_speed.md` (on this CPU caption scoring is the slower one,
0.42x CLIP + decode at the Shapes size)."""


def stages(a, out: Path):
    common = ["logger=csv", "trainer.enable_progress_bar=false", f"paths.data_dir={out / 'data'}"]
    shapes = ["data.image_size=32"]
    model = out / "bidirectional"
    clip = out / "clip"
    return [
        ("tokenize", lambda: Stage("tokenize", "t2i.cli.tokenize", [
            f"tokenizer_ckpt={a.vqgan}", "data=shapes", *shapes, f"paths.data_dir={out / 'data'}",
            f"output={out / 'codes'}", "overwrite=true", f"hydra.run.dir={out / 'runs' / 'tokenize'}"],
            out / "codes" / "manifest.json")),
        ("bidirectional", lambda: Stage("bidirectional", "t2i.cli.train", [
            "experiment=shapes_bidirectional", f"data.codes={out / 'codes'}", *common,
            f"trainer.max_epochs={a.epochs}", "test=false", f"hydra.run.dir={model}"], train_done(model))),
        ("clip", lambda: Stage("clip", "t2i.cli.train", [
            "experiment=shapes_clip", *shapes, *common, "test=false", f"hydra.run.dir={clip}"], train_done(clip))),
        ("caption", lambda: Stage("caption", "t2i.cli.evaluate", [
            "eval=shapes_caption", f"ckpt={best_checkpoint(model)}", f"eval.num_images={a.captions}", "device=cpu",
            f"output={out / 'caption'}", f"hydra.run.dir={out / 'caption'}"], out / "caption" / "metrics.json")),
        ("rerank", lambda: Stage("rerank", "t2i.cli.evaluate", [
            "eval=shapes", f"ckpt={best_checkpoint(model)}", f"clip.ckpt={best_checkpoint(clip)}",
            "rerank.combine=rank_sum", f"eval.num_captions={a.captions}", "eval.num_candidates=8", "sample.top_k=4",
            "metrics.extractor=null", "metrics.inception_score=false", "device=cpu", f"output={out / 'rerank'}",
            f"hydra.run.dir={out / 'rerank'}"], out / "rerank" / "metrics.json")),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/bidirectional")
    ap.add_argument("--vqgan", required=True, help="a shapes_vqgan checkpoint at 32 px")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--captions", type=int, default=500)
    ap.add_argument("--write", action="store_true", help="write experiments/bidirectional/RESULTS.md")
    a = ap.parse_args()
    out = Path(a.out).resolve()
    times = out / "seconds.json"
    seconds = json.loads(times.read_text()) if times.is_file() else {}
    chain = stages(a, out)
    for i, (name, make) in enumerate(chain, 1):
        stage = make()
        if stage.done.exists():
            print(f"[{i}/{len(chain)}] {name}: done before, skipped")
            continue
        seconds[name] = round(run_stage(stage, out, i, len(chain)), 1)
        times.write_text(json.dumps(seconds))
    cap = json.loads((out / "caption" / "metrics.json").read_text())
    rr = json.loads((out / "rerank" / "metrics.json").read_text())
    tr = json.loads(train_done(out / "bidirectional").read_text())
    res = {"caption": cap, "rerank": rr, "train": tr, "seconds": seconds}
    (out / "results.json").write_text(json.dumps(res, indent=2, ensure_ascii=False) + "\n")
    text = report(res, a)
    print(text)
    if a.write:
        (ROOT / "experiments" / "bidirectional" / "RESULTS.md").write_text(text)


def report(res: dict, a) -> str:
    cap, rr, tr = res["caption"], res["rerank"], res["train"]["metrics"]
    lines = [f"Written by `python experiments/bidirectional/run.py {' '.join(sys.argv[1:])}` on "
             f"{time.strftime('%Y-%m-%d')} (2-core CPU, shared with other jobs). Method: the module docstring of "
             "`experiments/bidirectional/run.py`; everything in `<out>/results.json`.", "",
             f"Training (`shapes_bidirectional`, {a.epochs} epochs): val image loss "
             f"{tr.get('val/image_loss', float('nan')):.3f} nats/code, val caption loss "
             f"{tr.get('val/caption_loss', float('nan')):.3f}, {res['train'].get('wall_seconds')} s.", "",
             "## Captioning (beam 4; parse_caption against the true spec)", "",
             "| split | colour | shape | position | size | all four | parsed | BLEU-4 | CIDEr-D | ROUGE-L |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for split, m in (cap.get("splits") or {}).items():
        acc, ng = m.get("acc") or {}, m
        lines.append(f"| {split} | " + " | ".join(
            f"{acc.get(k, float('nan')):.3f}" for k in ("color", "shape", "position", "size", "all", "parsed"))
            + " | " + " | ".join(f"{ng.get(k, float('nan')):.3f}" for k in ("bleu4", "cider", "rouge_l")) + " |")
    lines += ["", "## Reranking 8 candidates (oracle all-attribute accuracy of the pick; same candidates)", "",
              "| split | first sample | CLIP | caption likelihood | rank_sum | zsum | best of 8 (ceiling) |",
              "|---|---|---|---|---|---|---|"]
    for split, m in (rr.get("splits") or {}).items():
        by = m.get("acc_by") or {}
        lines.append(f"| {split} | " + " | ".join(f"{by.get(k, float('nan')):.3f}" for k in
                                                   ("first", "clip", "caption", "rank_sum", "zsum", "best_of_n")) + " |")
    lines += ["", f"Stage times (s): {json.dumps(res['seconds'])}.", "", READING]
    return "# Shapes in both directions\n\n" + "\n".join(lines)


if __name__ == "__main__":
    main()
