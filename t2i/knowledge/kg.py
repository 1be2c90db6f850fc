"""Knowledge-graph embeddings for entity vectors (ARTIST, issue 19), trained with PyKEEN.

ARTIST uses TransE vectors (100-d, over CN-DBpedia) as its entity table. :func:`train_kg` trains such vectors from
a triples file (``head<TAB>relation<TAB>tail`` lines; an optional header line), holds out a slice of the triples
(every entity of a held-out triple also occurs in training: PyKEEN's coverage split) and reports link prediction on
it with PyKEEN's :class:`~pykeen.evaluation.RankBasedEvaluator` (filtered, both sides, realistic rank): MRR and
Hits@1/3/10. :func:`write_kg` writes what the model side reads: ``entity2id.txt`` (EasyNLP/OpenKE form: the count,
then ``entity<TAB>id``), ``entity2vec.pt`` (a raw ``[num_ids, dim]`` tensor, row i = id i), ``relation2id.txt``
and ``metrics.json``.

Ids: without a lexicon, entities are numbered 0..n-1 in sorted order (PyKEEN's own order). With ``lexicon=`` (an
``entity2id.txt`` or plain entity file) the table is aligned to that file's ids: ``num_ids`` rows, the lexicon's
entities missing from the graph get zero rows (counted in the metrics), graph entities outside the lexicon are
trained but left out.

PyKEEN is imported lazily (it is the ``knowledge`` extra), so importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from t2i.data.skips import DataError, require_path

log = logging.getLogger("t2i.knowledge")


@dataclass
class TripleRead:
    triples: np.ndarray                   # [n, 3] str (head, relation, tail)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    examples: list[str] = field(default_factory=list)      # file:line of the first bad lines
    header: bool = False


def read_triples(path, key: str = "triples", keep_examples: int = 5) -> TripleRead:
    """``head<TAB>relation<TAB>tail`` lines -> ``[n, 3]`` string array. Bad lines (wrong column count, an empty
    field) are skipped and counted by reason; a first line ``head<TAB>relation<TAB>tail`` (any case) is a header.
    Exact duplicate triples are kept once."""
    p = require_path(path, key, kind="triples file (head<TAB>relation<TAB>tail lines)")
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{key}={path}: not readable UTF-8 text ({e}); expected head<TAB>relation<TAB>tail "
                        "lines") from None
    out: dict[tuple[str, str, str], None] = {}
    skipped: dict[str, int] = {}
    examples: list[str] = []
    header = False
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = [s.strip() for s in line.rstrip("\r").split("\t")]
        if n == 1 and [s.lower() for s in parts] in (["head", "relation", "tail"], ["h", "r", "t"],
                                                      ["subject", "predicate", "object"]):
            header = True
            continue
        reason = "bad_columns" if len(parts) != 3 else "empty_field" if not all(parts) else None
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
            if len(examples) < keep_examples:
                examples.append(f"{path}:{n} ({reason})")
            continue
        out.setdefault(tuple(parts), None)
    if not out:
        raise DataError(f"{key}={path}: no valid head<TAB>relation<TAB>tail line"
                        + (f" ({sum(skipped.values())} bad: {', '.join(examples)})" if skipped else ""))
    if skipped:
        log.warning("%s=%s: skipped %d bad line(s) (%s); first: %s", key, path, sum(skipped.values()),
                    ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())), ", ".join(examples))
    return TripleRead(np.array(list(out), dtype=str).reshape(-1, 3), skipped, examples, header)


@dataclass
class KGResult:
    vectors: torch.Tensor                 # [num_ids, dim] float32, row i = entity id i
    entity_to_id: dict[str, int]          # the ids rows are aligned to (the lexicon's when one was given)
    relation_to_id: dict[str, int]
    metrics: dict


@contextlib.contextmanager
def _quiet_fast_pykeen():
    """PyKEEN's training loop calls ``gc.collect()`` after every epoch, which costs ~0.4 s with torch and PyKEEN
    loaded; freezing the objects that exist before training makes those collections cheap (same results).
    Its CPU-only memory warnings are silenced."""
    gc.collect()
    gc.freeze()
    levels = {n: logging.getLogger(n).level for n in ("torch_max_mem", "torch_max_mem.api", "pykeen")}
    for n in levels:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pin_memory.*")
            warnings.filterwarnings("ignore", message=".*automatic memory utilization.*")
            yield
    finally:
        gc.unfreeze()
        for n, lvl in levels.items():
            logging.getLogger(n).setLevel(lvl)


def _entity_table(model) -> torch.Tensor:
    """The model's entity vectors as a real [n, d] table (complex models such as RotatE: real and imaginary
    parts side by side, so d = 2 x the complex dimension)."""
    rep = model.entity_representations[0]
    with torch.no_grad():
        e = rep(indices=None).detach().cpu()
    if e.is_complex():
        e = torch.cat([e.real, e.imag], dim=-1)
    return e.reshape(e.shape[0], -1).float()


METRICS = {  # our name -> PyKEEN's metric key (both sides, realistic rank)
    "mrr": "both.realistic.inverse_harmonic_mean_rank",
    "hits@1": "both.realistic.hits_at_1",
    "hits@3": "both.realistic.hits_at_3",
    "hits@10": "both.realistic.hits_at_10",
    "mean_rank": "both.realistic.arithmetic_mean_rank",
}


def train_kg(triples_path, model: str = "TransE", dim: int = 100, epochs: int = 100, batch_size: int = 256,
             lr: float = 0.01, seed: int = 0, heldout: float = 0.05, num_negs: int = 1, lexicon=None,
             device: str = "cpu", progress: bool = True, key: str = "triples",
             model_kwargs: dict | None = None) -> KGResult:
    """Train KG embeddings (any PyKEEN model by name: TransE, RotatE, DistMult, ...) on ``triples_path`` and
    evaluate link prediction on a held-out ``heldout`` fraction of the triples (0: no evaluation).

    Deterministic for a ``seed`` on CPU. ``lexicon``: an entity file (or :class:`EntityLexicon`) whose ids the
    returned table follows. Returns the vectors, the id maps and the metrics (mrr, hits@1/3/10, mean_rank plus
    counts and timing).
    """
    if not 0 <= heldout < 1:
        raise DataError(f"heldout={heldout}: must be a fraction in [0, 1) of the triples to hold out")
    for name, v in (("dim", dim), ("epochs", epochs), ("batch_size", batch_size), ("num_negs", num_negs)):
        if int(v) < 1:
            raise DataError(f"{name}={v}: must be a positive integer")
    read = read_triples(triples_path, key=key)
    from pykeen.evaluation import RankBasedEvaluator
    from pykeen.models import model_resolver
    from pykeen.training import SLCWATrainingLoop
    from pykeen.triples import TriplesFactory
    from pykeen.utils import set_random_seed

    try:
        model_cls = model_resolver.lookup(model)
    except (KeyError, ValueError):
        raise DataError(f"kg_model={model}: not a PyKEEN model; use e.g. TransE, RotatE, DistMult, ComplEx "
                        "(pykeen.models)") from None
    tf = TriplesFactory.from_labeled_triples(read.triples)
    n_held = int(round(heldout * tf.num_triples))
    if heldout > 0 and n_held >= 1 and tf.num_triples - n_held >= 1:
        with _quiet_fast_pykeen():
            train_tf, test_tf = tf.split([1.0 - heldout, heldout], random_state=seed)
    else:
        train_tf, test_tf = tf, None
        if heldout > 0:
            log.warning("%s=%s: %d triples are too few to hold out %.0f%%; no link-prediction metrics", key,
                        triples_path, tf.num_triples, 100 * heldout)

    t_start = time.perf_counter()
    set_random_seed(seed)
    dev = torch.device(device)
    with _quiet_fast_pykeen():
        kge = model_cls(triples_factory=train_tf, embedding_dim=int(dim), random_seed=seed,
                        **(model_kwargs or {})).to(dev)
        optimizer = torch.optim.Adam(kge.parameters(), lr=lr)
        loop = SLCWATrainingLoop(model=kge, triples_factory=train_tf, optimizer=optimizer,
                                 negative_sampler_kwargs={"num_negs_per_pos": int(num_negs)})
        losses = loop.train(triples_factory=train_tf, num_epochs=int(epochs), batch_size=int(batch_size),
                            use_tqdm=progress, use_tqdm_batch=False)
    t_train = time.perf_counter() - t_start

    metrics: dict = {"model": model_cls.__name__, "dim": int(dim), "epochs": int(epochs), "seed": int(seed),
                     "triples": int(tf.num_triples), "train_triples": int(train_tf.num_triples),
                     "heldout_triples": int(test_tf.num_triples) if test_tf is not None else 0,
                     "entities": int(tf.num_entities), "relations": int(tf.num_relations),
                     "skipped_lines": dict(read.skipped), "final_loss": float(losses[-1]) if losses else None,
                     "train_seconds": round(t_train, 2)}
    if test_tf is not None:
        seen = set(train_tf.mapped_triples[:, [0, 2]].flatten().tolist())
        metrics["heldout_entities_unseen_in_training"] = len(
            set(test_tf.mapped_triples[:, [0, 2]].flatten().tolist()) - seen)  # 0: PyKEEN's coverage split
        t0 = time.perf_counter()
        kge.eval()
        with _quiet_fast_pykeen():
            res = RankBasedEvaluator(filtered=True).evaluate(
                kge, test_tf.mapped_triples, additional_filter_triples=[train_tf.mapped_triples],
                batch_size=int(batch_size), use_tqdm=False, device=dev)
        for ours, theirs in METRICS.items():
            metrics[ours] = float(res.get_metric(theirs))
        metrics["random_mrr_expected"] = _random_mrr(tf.num_entities)
        metrics["eval_seconds"] = round(time.perf_counter() - t0, 2)

    table = _entity_table(kge)
    entity_to_id = dict(tf.entity_to_id)
    if lexicon is not None:
        table, entity_to_id, align = _align(table, entity_to_id, lexicon)
        metrics.update(align)
    metrics["vector_dim"] = int(table.shape[1])
    return KGResult(table, entity_to_id, dict(tf.relation_to_id), metrics)


def train_transe(triples_path, dim: int = 100, epochs: int = 100, seed: int = 0, heldout: float = 0.05,
                 **kwargs) -> tuple[torch.Tensor, dict]:
    """TransE vectors and link-prediction metrics (see :func:`train_kg`)."""
    r = train_kg(triples_path, model="TransE", dim=dim, epochs=epochs, seed=seed, heldout=heldout, **kwargs)
    return r.vectors, r.metrics


def _random_mrr(n: int) -> float:
    """Expected reciprocal rank of a uniformly random rank among ``n`` candidates (unfiltered bound)."""
    return float(sum(1.0 / k for k in range(1, n + 1)) / n)


def _align(table: torch.Tensor, entity_to_id: dict[str, int], lexicon):
    if isinstance(lexicon, (str, Path)):
        from t2i.knowledge.lexicon import EntityLexicon

        lexicon = EntityLexicon.from_file(lexicon, key="lexicon")
    out = torch.zeros(lexicon.num_ids, table.shape[1])
    names = {}
    hit = 0
    for name, i in zip(lexicon.names, lexicon.ids):
        names[name] = i
        j = entity_to_id.get(name)
        if j is not None:
            out[i] = table[j]
            hit += 1
    info = {"lexicon_entities": len(lexicon.names), "lexicon_num_ids": int(lexicon.num_ids),
            "lexicon_entities_in_graph": hit, "lexicon_entities_not_in_graph": len(lexicon.names) - hit}
    if hit == 0:
        raise DataError(f"lexicon={lexicon.source}: none of its {len(lexicon.names)} entities occurs in the "
                        "triples; the graph must name entities exactly as the lexicon does")
    if hit < len(lexicon.names):
        log.warning("lexicon=%s: %d of %d entities do not occur in the triples; their vectors are zero",
                    lexicon.source, len(lexicon.names) - hit, len(lexicon.names))
    return out, names, info


def write_kg(result: KGResult, output, entity_file: str = "entity2id.txt",
             vector_file: str = "entity2vec.pt") -> dict[str, str]:
    """Write entity2id.txt (count header, ``entity<TAB>id``), entity2vec.pt, relation2id.txt and metrics.json
    into the folder ``output``; returns the paths by kind."""
    from t2i.knowledge.vectors import save_vectors

    out = Path(str(output))
    out.mkdir(parents=True, exist_ok=True)

    def id_file(path: Path, mapping: dict[str, int]) -> None:
        rows = sorted(mapping.items(), key=lambda kv: kv[1])
        path.write_text(f"{len(rows)}\n" + "".join(f"{k}\t{v}\n" for k, v in rows), encoding="utf-8")

    paths = {"entities": out / entity_file, "vectors": out / vector_file, "relations": out / "relation2id.txt",
             "metrics": out / "metrics.json"}
    id_file(paths["entities"], result.entity_to_id)
    save_vectors(result.vectors, paths["vectors"])
    id_file(paths["relations"], result.relation_to_id)
    paths["metrics"].write_text(json.dumps(result.metrics, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return {k: str(v) for k, v in paths.items()}
