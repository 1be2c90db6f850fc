"""t2i-knowledge: entity vectors for knowledge injection (ARTIST): train them on a knowledge graph, inspect them.

    t2i-knowledge train triples=data/kg/triples.tsv dim=100 epochs=200 output=data/kg
    t2i-knowledge train triples=data/kg/triples.tsv kg_model=RotatE dim=50 heldout=0.1 output=data/kg_rotate
    t2i-knowledge inspect lexicon=data/kg/entity2id.txt vectors=data/kg/entity2vec.pt

``train`` reads ``head<TAB>relation<TAB>tail`` lines, trains a PyKEEN model (TransE by default, as ARTIST), reports
link prediction (MRR, Hits@1/3/10) on a held-out slice and writes ``entity2id.txt``, ``entity2vec.pt``,
``relation2id.txt`` and ``metrics.json`` into ``output``. ``inspect`` prints counts, dimensions, norms and the
nearest neighbours of a few entities. Options: conf/knowledge.yaml.
"""

from __future__ import annotations

import json
import logging

import hydra
from omegaconf import DictConfig

from t2i import checks
from t2i.cli.common import clear_errors, first_word_as
from t2i.data.skips import DataError

log = logging.getLogger("t2i.knowledge")
COMMANDS = ("train", "inspect")


def _entities(key, value):
    values = value if isinstance(value, list) else [value]
    if value is not None and (not values or not all(isinstance(v, str | int) and str(v).strip() for v in values)):
        raise DataError(f"{key}={checks.show(value)} must be an entity name or a list of them, e.g. {key}='[a, b]'")


# every key of conf/knowledge.yaml (types and ranges for both commands; paths where the command reads them)
KEYS = {
    "kg_model": checks.text(), "dim": checks.count(), "epochs": checks.count(), "batch_size": checks.count(),
    "lr": checks.number(0, low_open=True), "num_negs": checks.count(), "seed": checks.integer(),
    "heldout": checks.number(0, 1, high_open=True), "lexicon": checks.file(optional=True, utf8=True,
                                                                          what="entity file"),
    "device": checks.device(), "progress": checks.boolean(), "entities": _entities, "neighbours": checks.count(),
    "n_show": checks.count(),
}
PATHS = {"train": {"triples": checks.file(utf8=True, what="triples file (head<TAB>relation<TAB>tail lines)"),
                   "output": checks.output_folder(what="folder for the four files")},
         "inspect": {"vectors": checks.file(what="entity2vec.pt, .npy or text vectors")}}


def need(cfg: DictConfig, key: str):
    if cfg.get(key) in (None, ""):
        raise DataError(f"t2i-knowledge {cfg.command}: `{key}=...` is required")
    return cfg[key]


def cmd_train(cfg: DictConfig) -> dict:
    from t2i.knowledge.kg import train_kg, write_kg

    triples, output = need(cfg, "triples"), need(cfg, "output")
    result = train_kg(triples, model=cfg.kg_model, dim=cfg.dim, epochs=cfg.epochs, batch_size=cfg.batch_size,
                      lr=cfg.lr, seed=cfg.seed, heldout=cfg.heldout, num_negs=cfg.num_negs,
                      lexicon=cfg.lexicon or None, device=cfg.device, progress=cfg.progress)
    paths = write_kg(result, output)
    m = result.metrics
    print(f"knowledge: {m['model']} dim {m['vector_dim']} on {m['train_triples']} triples ({m['entities']} entities, "
          f"{m['relations']} relations) in {m['train_seconds']:.1f}s; skipped lines: {m['skipped_lines'] or 0}")
    if "mrr" in m:
        print(f"held-out link prediction ({m['heldout_triples']} triples, filtered, both sides): MRR {m['mrr']:.3f}, "
              f"Hits@1 {m['hits@1']:.3f}, Hits@3 {m['hits@3']:.3f}, Hits@10 {m['hits@10']:.3f} "
              f"(random MRR ~{m['random_mrr_expected']:.3f})")
    print(f"wrote {paths['entities']}, {paths['vectors']} [{result.vectors.shape[0]}, {result.vectors.shape[1]}], "
          f"{paths['relations']}, {paths['metrics']}")
    return {"paths": paths, "metrics": m}


def inspect_vectors(vectors, names: dict[int, str], show: list[int], k: int = 5) -> dict:
    """Counts, norms and the ``k`` nearest neighbours (cosine) of the ids ``show``."""
    import torch

    norms = vectors.norm(dim=1)
    zero = norms == 0
    nz = norms[~zero]
    stats = {
        "rows": int(vectors.shape[0]), "dim": int(vectors.shape[1]), "zero_rows": int(zero.sum()),
        "norm_min": round(float(nz.min()), 4) if len(nz) else 0.0,
        "norm_median": round(float(nz.median()), 4) if len(nz) else 0.0,
        "norm_max": round(float(nz.max()), 4) if len(nz) else 0.0,
    }
    if names:
        stats["rows_without_entity"] = int(vectors.shape[0] - len(set(names)))
    unit = vectors / norms.clamp_min(1e-12)[:, None]
    candidates = torch.tensor(sorted(names) if names else range(vectors.shape[0]), dtype=torch.long)
    candidates = candidates[~zero[candidates]]
    neighbours = {}
    for i in show:
        label = names.get(i, str(i))
        if zero[i]:
            neighbours[label] = "zero vector"
            continue
        sims = unit[candidates] @ unit[i]
        sims[candidates == i] = -2.0
        top = sims.topk(min(k, max(len(candidates) - 1, 0)))
        neighbours[label] = ", ".join(f"{names.get(int(candidates[j]), str(int(candidates[j])))} ({float(s):.3f})"
                                      for s, j in zip(top.values, top.indices))
    stats["neighbours"] = neighbours
    return stats


def cmd_inspect(cfg: DictConfig) -> dict:
    from t2i.knowledge.vectors import load_vectors

    names: dict[int, str] = {}
    num_ids = None
    if cfg.lexicon:
        from t2i.knowledge.lexicon import EntityLexicon

        lex = EntityLexicon.from_file(cfg.lexicon, key="lexicon")
        names = dict(zip(lex.ids, lex.names))
        num_ids = lex.num_ids
    vectors = load_vectors(need(cfg, "vectors"), num_ids=num_ids, key="vectors")
    if cfg.entities:
        by_name = {v: i for i, v in names.items()}
        wanted = [cfg.entities] if isinstance(cfg.entities, str) else list(cfg.entities)
        unknown = [e for e in wanted if str(e) not in by_name]
        if unknown:
            raise DataError(f"entities={unknown}: not in lexicon={cfg.lexicon}" if cfg.lexicon else
                            "entities=... needs lexicon=... (the entity file that names the rows)")
        show = [by_name[str(e)] for e in wanted]
    else:
        show = (sorted(names) if names else list(range(vectors.shape[0])))[: cfg.n_show]
    stats = inspect_vectors(vectors, names, show, k=cfg.neighbours)
    if cfg.lexicon:
        stats = {"lexicon_entities": len(names), "lexicon_num_ids": num_ids, **stats}
    print(json.dumps(stats, ensure_ascii=False, indent=2))
    return stats


def run(cfg: DictConfig) -> dict:
    if cfg.command not in COMMANDS:
        raise DataError(f"t2i-knowledge: unknown command {cfg.command!r}; use one of {', '.join(COMMANDS)}")
    for key in PATHS[cfg.command]:
        need(cfg, key)
    checks.check_keys(cfg, {**KEYS, **PATHS[cfg.command]})
    return globals()[f"cmd_{cfg.command}"](cfg)


@hydra.main(version_base="1.3", config_path="../conf", config_name="knowledge")
@clear_errors
def _hydra_main(cfg: DictConfig) -> None:
    run(cfg)


def main() -> None:
    """``t2i-knowledge <command> key=value ...``: the first bare word becomes ``command=<word>``."""
    first_word_as("command", __doc__)
    _hydra_main()


if __name__ == "__main__":
    main()
