"""The text-to-image protocols of ``t2i-eval`` (``eval=shapes``, ``shapes_kg``, ``muge``, ``coco_cn``, ``coco30k``):
captions -> ``num_candidates`` samples each -> rerank -> metrics, shared across processes (:mod:`t2i.eval.processes`);
and the table of a run's numbers beside the protocol's published anchors."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from torchvision.utils import save_image
from tqdm.auto import tqdm

from t2i.errors import ConfigError
from t2i.eval.generation import load_clip
from t2i.eval.items import scores_for, shapes_items, shapes_kg_items, shapes_kg_world, source_items
from t2i.eval.processes import autocast_dtype, gathered, rank_world, sha256

log = logging.getLogger("t2i.eval")


def generation(cfg: DictConfig, device) -> dict:
    from t2i.data.oracle import score as oracle
    from t2i.data.shapes import caption as shapes_caption
    from t2i.eval.generation import Loop
    from t2i.metrics.scores import to_uint8
    from t2i.pipeline.parts import encode_prompts
    from t2i.pipeline.parts import parts_for as build
    from t2i.viz import captioned_rows

    p = cfg.eval
    from t2i.sampling import check_sampling  # settings that cannot work fail before any model loads

    check_sampling(1, cfg.sample.top_k, cfg.sample.top_p, cfg.sample.temperature, cfg.sample.cfg_scale,
                   prefix="sample.")
    for key, v in (("eval.num_candidates", p.num_candidates), ("batch_size", cfg.batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{key}={v} must be an integer >= 1")
    from t2i.pipeline.caption_rerank import (
        accuracy_by_ranking,
        candidate_rows,
        check_captioning,
        check_combine,
        oracle_hits,
    )

    rr = cfg.get("rerank") or {}
    by = rr.get("backend", "clip")
    if by not in ("clip", "caption"):
        raise ConfigError(f"rerank.backend={by!r}: use clip (the CLIP of clip.*) or caption (the caption's likelihood "
                          f"given the codes, a model.model.captioning=true checkpoint)")
    combine = check_combine(rr.get("combine"), bool(cfg.clip.ckpt), clip_keys="clip.ckpt")
    model, image_tok, tok, link = build(cfg, device)
    if by == "caption" or combine:
        check_captioning(model, f"ckpt={cfg.ckpt}")
    clip = load_clip(cfg, device)
    size = image_tok.downsample * model.grid[0]
    n_cand = int(p.num_candidates)
    if clip is None and n_cand > 1 and by == "clip":
        log.warning("no clip.ckpt: the first of %d candidates is scored, none is reranked", n_cand)
    sample = {k: cfg.sample[k] for k in ("top_k", "top_p", "temperature", "cfg_scale", "use_cache")}
    rank, world = rank_world()
    amp = autocast_dtype(cfg, device)
    bs = int(cfg.batch_size)
    splits = list(p.splits) if p.kind == "shapes" else [str(p.get("split_name", "val"))]
    kg_world = shapes_kg_world(p) if p.get("benchmark") == "shapes_kg" else None
    result, grids = {"splits": {}}, []
    for split in splits:
        if kg_world is not None:
            items = shapes_kg_items(split, int(p.num_captions), int(p.caption_seed), size, kg_world)
        elif p.kind == "shapes":
            items = shapes_items(split, int(p.num_captions), int(p.caption_seed), size, str(p.lang))
        else:
            items = source_items(p, size)
        n = len(items.captions)
        scores, cache = scores_for(cfg, clip, device, split, size, n)
        hits = {"first": [], "chosen": []}
        keep = {"rows": [], "scored": []}
        mine = sum(len(range(a, min(a + bs, n))) for k, a in enumerate(range(0, n, bs)) if k % world == rank)
        bar = tqdm(total=mine, desc=f"{p.name} {split}" + (f" rank 0 of {world}" if world > 1 else ""),
                   disable=not cfg.progress or rank != 0)

        def hook(start, captions, drawn, items=items, hits=hits, keep=keep, bar=bar):
            if items.specs is not None:  # the oracle reads pixels on the CPU: uint8 crosses, once
                specs = items.specs[start:start + len(captions)]
                both = to_uint8(torch.stack([drawn.candidates[:, 0], drawn.images])).permute(0, 1, 3, 4, 2).cpu()
                hits["first"].append(oracle(both[0].numpy(), specs) | {"n": len(specs)})
                hits["chosen"].append(oracle(both[1].numpy(), specs) | {"n": len(specs)})
            if drawn.scores is not None or drawn.caption_scores is not None:  # every candidate's scores
                right = oracle_hits(drawn.candidates, items.specs[start:start + len(captions)]) \
                    if items.specs is not None else None
                keep["scored"] += candidate_rows(start, captions, drawn, right)
            for i, c in enumerate(captions[: max(0, 8 - start)]):  # the first 8 captions, whichever rank drew them
                if items.specs is not None:  # Shapes: the English caption, legible without a CJK font
                    c = shapes_caption(items.specs[start + i], "en")
                keep["rows"].append((start + i, c, drawn.candidates[i, : min(8, n_cand)].float().cpu(),
                                     int(drawn.chosen[i])))
            bar.update(len(captions))

        loop = Loop(model, image_tok, lambda caps: encode_prompts(tok, caps, model.text_len), scores, clip, n_cand,
                    bs, int(cfg.seed), sample, rank=rank, world_size=world, autocast=amp, entities=link,
                    rerank=by, combine=combine)
        t0 = time.perf_counter()
        loop.run(items.captions, items.real, hook)
        bar.close()
        if cache is not None and not scores.real_loaded:
            state = scores.real_state()  # summed over the ranks (collective)
            if rank == 0:
                cache.save(state)
        metrics = scores.compute() if scores.frechet or scores.clip_score or scores.inception_score else {}
        for which in ("first", "chosen") if items.specs is not None else ():
            every = [h for part in gathered(hits[which]) for h in part]
            total = sum(h["n"] for h in every)
            acc = {a: sum(h[a] * h["n"] for h in every) / total for a in every[0] if a != "n"}
            metrics[f"acc_{which}"] = acc
        metrics.update(n=n, seconds=time.perf_counter() - t0, real_from_cache=scores.real_loaded,
                       real_skipped=sum(gathered(items.skipped.get("count", 0))), extractors=scores.describe(),
                       real_cache=str(cache.path) if cache else None)
        scored = sorted((r for part in gathered(keep["scored"]) for r in part), key=lambda r: r["index"])
        if scored:
            metrics["acc_by"] = accuracy_by_ranking(scored) or None
            for key, name in (("clip", "clip_chosen_mean"), ("caption_ll", "caption_ll_chosen_mean")):
                if scored[0][key] is not None:
                    metrics[name] = sum(r[key][r["chosen"]] for r in scored) / len(scored)
            if rank == 0:
                mode = "w" if split == splits[0] else "a"  # this run's splits only
                with open(Path(cfg.output) / "rerank_scores.jsonl", mode, encoding="utf-8") as f:
                    for r in scored:
                        f.write(json.dumps({"split": split, **r}, ensure_ascii=False) + "\n")
        result["splits"][split] = metrics
        rows = sorted((r for part in gathered(keep["rows"]) for r in part), key=lambda r: r[0])
        rows = [r[1:] for r in rows]
        if rows and rank == 0:
            per = rows[0][1].shape[0]
            grids.append(captioned_rows(torch.cat([r[1] for r in rows]),
                                        [f"{r[0]}  [{split}; chosen #{r[2]}]" for r in rows], per_row=per,
                                        marked=[r[2] if r[2] < per else None for r in rows]))  # red frame
    if grids and rank == 0:
        width = max(g.shape[-1] for g in grids)
        pad = [torch.nn.functional.pad(g, (0, width - g.shape[-1]), value=1.0) for g in grids]
        save_image((torch.cat(pad, dim=2)[0] + 1) / 2, Path(cfg.output) / "samples.png")
    first = result["splits"][splits[0]]
    summary = {k: first[k] for k in ("fid", "is_mean", "is_std", "clip_score", "fd_clip") if k in first}
    if p.kind == "shapes":
        for split in splits:
            tag = "" if split == "test" else f"_{split}"
            summary[f"acc{tag}_first"] = result["splits"][split]["acc_first"]["all"]
            summary[f"acc{tag}_rerank"] = result["splits"][split]["acc_chosen"]["all"]
    result["summary"] = summary
    result["checkpoints"] = {"transformer": str(cfg.ckpt), "transformer_sha256": sha256(cfg.ckpt),
                             "clip": cfg.clip.ckpt and str(cfg.clip.ckpt), "clip_sha256": sha256(cfg.clip.ckpt),
                             "clip_backend": cfg.clip.backend if cfg.clip.ckpt else None}
    result["protocol"] = {"image_size": size, "num_candidates": n_cand, "sample": sample,
                          "reranked": (clip is not None or by == "caption") and n_cand > 1, "processes": world,
                          "rerank": {"backend": by, "combine": combine},
                          "knowledge": None if link is None else {"lexicon": link.lexicon.fingerprint,
                                                                  "entities": len(link.lexicon),
                                                                  "max_entities": link.max_entities},
                          "autocast": str(amp).removeprefix("torch.") if amp else None}
    return result


# -- reporting ----------------------------------------------------------------------------------
def fmt(v) -> str:
    return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def table(cfg: DictConfig, summary: dict) -> str:
    """Our row beside the protocol's published anchors (each with its source and differences)."""
    cols = list(summary)
    lines = ["| model | " + " | ".join(cols) + " | source | protocol differences |",
             "|---" * (len(cols) + 3) + "|",
             f"| **ours** ({Path(str(cfg.ckpt or cfg.tokenizer_ckpt)).name}) | "
             + " | ".join(fmt(summary[c]) for c in cols) + " | this run | see metrics.json |"]
    for a in cfg.eval.get("anchors") or []:
        lines.append(f"| {a.model} | " + " | ".join(fmt(a.get(c)) for c in cols) + f" | {a.source} | {a.get('notes', '')} |")
    return "\n".join(lines)
