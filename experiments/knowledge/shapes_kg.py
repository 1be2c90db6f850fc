"""The Shapes-KG ablation (issue 19): does ARTIST's knowledge let the model draw objects it never saw named?

    python experiments/knowledge/shapes_kg.py --out outputs/shapes_kg --seeds 0 1
    python experiments/knowledge/shapes_kg.py --out outputs/shapes_kg --vqgan <shapes_vqgan .ckpt> --arms on off trainable

Stages, each a CLI run with its log under ``<out>/logs`` (a stage whose output exists is skipped):
``t2i-data shapes_kg`` (32 px, 5000 train captions, half naming objects; 500 per eval split) ->
``t2i-knowledge train`` (TransE, 100-d, over triples.tsv; link-prediction metrics on a held-out slice) ->
a ``shapes_vqgan`` tokenizer (trained on plain Shapes like the demo's, unless ``--vqgan`` names one) ->
``t2i-tokenize`` -> per seed and arm ``t2i-train experiment=shapes_kg_transformer`` (arm ``on``: knowledge
fused at the input, frozen vectors; ``off``: ``model.knowledge.enabled=false``; ``trainable``: vectors
trained too) -> ``t2i-eval eval=shapes_kg`` (first sample per caption, top-k 4, no reranking, 500 captions
per split: ``test`` names seen objects, ``kg_heldout`` objects named in no training caption).
Writes ``<out>/results.json`` and, with ``--write``, experiments/knowledge/RESULTS_shapes_kg.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from t2i.cli.demo import Stage, best_checkpoint, run_stage, train_done

ARMS = {"on": [], "off": ["model.knowledge.enabled=false"], "trainable": ["model.knowledge.trainable=true"]}
ROOT = Path(__file__).resolve().parents[2]


def stages(a, out: Path) -> list[tuple[str, callable]]:
    data = out / "data" / "shapes_kg_32_zh"
    common = ["logger=csv", "trainer.enable_progress_bar=false", f"paths.data_dir={out / 'data'}"]
    chain = [
        ("data", lambda: Stage("data", "t2i.cli.data", [
            "command=shapes_kg", f"output={data}", "image_size=32", "progress=false",
            f"hydra.run.dir={out / 'runs' / 'data'}"], data / "tokenizer.json")),
        ("kg", lambda: Stage("kg", "t2i.cli.knowledge", [
            "command=train", f"triples={data / 'triples.tsv'}", f"lexicon={data / 'entity2id.txt'}", "dim=100",
            f"epochs={a.kg_epochs}", "progress=false", f"output={data / 'kg'}",
            f"hydra.run.dir={out / 'runs' / 'kg'}"], data / "kg" / "entity2vec.pt")),
    ]
    if not a.vqgan:
        chain.append(("vqgan", lambda: Stage("vqgan", "t2i.cli.train", [
            "experiment=shapes_vqgan", "data.image_size=32", *common, "trainer.max_epochs=5", "test=false",
            f"hydra.run.dir={out / 'vqgan'}"], train_done(out / "vqgan"))))
    vqgan = (lambda: a.vqgan) if a.vqgan else (lambda: best_checkpoint(out / "vqgan"))
    chain.append(("tokenize", lambda: Stage("tokenize", "t2i.cli.tokenize", [
        f"tokenizer_ckpt={vqgan()}", "data=shapes_kg", "data.image_size=32", f"paths.data_dir={out / 'data'}",
        f"output={out / 'codes'}", "overwrite=true", f"hydra.run.dir={out / 'runs' / 'tokenize'}"],
        out / "codes" / "manifest.json")))
    for seed in a.seeds:
        for arm in a.arms:
            name = f"{arm}_s{seed}"
            run = out / name

            def train(run=run, arm=arm, seed=seed, name=name):
                return Stage(f"train_{name}", "t2i.cli.train", [
                    "experiment=shapes_kg_transformer", f"data.codes={out / 'codes'}", f"kg_dir={data}", *common,
                    f"seed={seed}", f"trainer.max_epochs={a.epochs}", "test=false", f"hydra.run.dir={run}",
                    *ARMS[arm]], train_done(run))

            def evaluate(run=run, name=name):
                return Stage(f"eval_{name}", "t2i.cli.evaluate", [
                    "eval=shapes_kg", f"ckpt={best_checkpoint(run)}", f"eval.meta={data / 'meta.json'}",
                    f"eval.num_captions={a.captions}", "eval.num_candidates=1", "sample.top_k=4",
                    "metrics.extractor=null", "metrics.inception_score=false", "metrics.clip_score=false",
                    "metrics.fd_clip=false", "device=cpu", f"output={run / 'eval'}",
                    f"hydra.run.dir={run / 'eval'}"], run / "eval" / "metrics.json")

            chain += [(f"train_{name}", train), (f"eval_{name}", evaluate)]
    return chain


def collect(a, out: Path, seconds: dict) -> dict:
    data = out / "data" / "shapes_kg_32_zh"
    kg = json.loads((data / "kg" / "metrics.json").read_text())
    runs = {}
    for seed in a.seeds:
        for arm in a.arms:
            run = out / f"{arm}_s{seed}"
            ev = json.loads((run / "eval" / "metrics.json").read_text())
            tr = json.loads(train_done(run).read_text())
            runs[f"{arm}_s{seed}"] = {
                "arm": arm, "seed": seed, "val_image_loss": tr["metrics"].get("val/image_loss"),
                "train_seconds": tr.get("wall_seconds"), "summary": ev["summary"],
                "per_attribute": {k: v.get("acc_first") for k, v in (ev.get("splits") or {}).items()}}
    return {"kg": kg, "runs": runs, "seconds": seconds, "args": vars(a)}


def table(res: dict) -> str:
    arms = sorted({r["arm"] for r in res["runs"].values()}, key=list(ARMS).index)
    lines = ["| arm | seeds | test all-attribute (first sample) | kg_heldout all-attribute | kg_heldout colour | "
             "kg_heldout shape | val image loss |", "|---|---|---|---|---|---|---|"]
    for arm in arms:
        rs = [r for r in res["runs"].values() if r["arm"] == arm]

        def stat(key, rs=rs):
            xs = [r["summary"][key] for r in rs]
            spread = f" ± {statistics.pstdev(xs):.3f}" if len(xs) > 1 else ""
            return f"{statistics.mean(xs):.3f}{spread} ({', '.join(f'{x:.3f}' for x in xs)})"

        loss = statistics.mean(r["val_image_loss"] for r in rs)
        held = {a: statistics.mean(r["per_attribute"]["kg_heldout"][a] for r in rs) for a in ("color", "shape")}
        lines.append(f"| {arm} | {len(rs)} | {stat('acc_first')} | {stat('acc_kg_heldout_first')} | "
                     f"{held['color']:.3f} | {held['shape']:.3f} | {loss:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/shapes_kg")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--arms", nargs="+", default=["on", "off"], choices=list(ARMS))
    ap.add_argument("--vqgan", help="a shapes_vqgan checkpoint (32 px) instead of training one")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--kg-epochs", type=int, default=200)
    ap.add_argument("--captions", type=int, default=500)
    ap.add_argument("--write", action="store_true", help="write experiments/knowledge/RESULTS_shapes_kg.md")
    ap.add_argument("--until", help="stop after this stage (data, kg, vqgan, tokenize, train_on_s0, ...)")
    a = ap.parse_args()
    out = Path(a.out).resolve()
    chain = stages(a, out)
    seconds = {}
    times = out / "seconds.json"
    seconds.update(json.loads(times.read_text()) if times.is_file() else {})
    for i, (name, make) in enumerate(chain, 1):
        stage = make()
        if stage.done.exists():
            print(f"[{i}/{len(chain)}] {name}: done before, skipped")
            if name == a.until:
                return
            continue
        seconds[name] = round(run_stage(stage, out, i, len(chain)), 1)
        print(f"[{i}/{len(chain)}] {name}: {seconds[name]} s", flush=True)
        if name == a.until:
            (out / "seconds.json").write_text(json.dumps(seconds))
            return
    times.write_text(json.dumps(seconds))
    res = collect(a, out, seconds)
    (out / "results.json").write_text(json.dumps(res, indent=2, ensure_ascii=False) + "\n")
    print(table(res))
    if a.write:
        write(res, a)


def write(res: dict, a) -> None:
    kg = res["kg"]
    s = res["seconds"]
    one = sum(v for k, v in s.items() if k in ("data", "kg", "vqgan", "tokenize")) + \
        s.get(f"train_on_s{a.seeds[0]}", 0) + s.get(f"eval_on_s{a.seeds[0]}", 0)
    cmd = "python experiments/knowledge/shapes_kg.py " + " ".join(sys.argv[1:])
    text = f"""# Shapes-KG: what the knowledge graph buys

Written by `{cmd}` on {time.strftime('%Y-%m-%d')} (2-core CPU). Method: the module docstring of
`experiments/knowledge/shapes_kg.py`; per-split numbers in `<out>/results.json`.

Data: 96 made-up objects, 4 per (colour, shape) pair: 3 seen in training captions (half of the 5000
training captions name an object, half are plain Shapes captions), 1 held out (named in no training
caption; its name shares no character with the seen names). `triples.tsv` states every object's colour
and shape plus two distractor relations. TransE (PyKEEN, 100-d, {a.kg_epochs} epochs): held-out link
prediction MRR {kg.get('mrr', float('nan')):.3f}, Hits@10 {kg.get('hits@10', float('nan')):.3f}.

Oracle all-attribute accuracy of the first sample (colour, shape, position and size all right), 500
captions per split, top-k 4, mean ± population std over seeds (each seed's value in brackets):

{table(res)}

Stage times (s): {json.dumps(s)}. One arm's whole chain (data, TransE, VQGAN, tokenize, transformer,
eval): {one:.0f} s.
"""
    (ROOT / "experiments" / "knowledge" / "RESULTS_shapes_kg.md").write_text(text)


if __name__ == "__main__":
    main()
