"""t2i-eval: benchmark numbers from one command, with the protocol written down.

    t2i-eval eval=shapes ckpt=<transformer .ckpt> clip.ckpt=<clip .ckpt>
    t2i-eval eval=muge ckpt=... clip.backend=cn_clip clip.model_name=ViT-B-16 clip.ckpt=clip_cn_vit-b-16.pt
    t2i-eval eval=coco30k ckpt=... metrics.feature_extractor_weights_path=weights-inception-2015-12-05-6726825d.pth
    t2i-eval eval=reconstruction tokenizer_ckpt=<vqgan .ckpt>
    t2i-eval eval=spade ckpt=<spade .ckpt>
    t2i-eval eval=shapes_caption ckpt=<transformer .ckpt with captioning>    (also muge_caption, coco_cn_caption)

Protocols live in ``conf/eval/``. Generation protocols draw ``num_candidates`` samples per caption,
keep CLIP's best (or the first drawn without a CLIP; ``rerank.backend=caption``: the best by the caption's
likelihood given the codes under the transformer itself; ``rerank.combine=rank_sum|zsum``: by both, see
:mod:`t2i.pipeline.caption_rerank`), and score the chosen images (every candidate's scores in ``rerank_scores.jsonl``;
on Shapes, ``acc_by``: the oracle's accuracy under each available ranking and the best-of-n ceiling); ``shapes`` adds
the oracle's attribute accuracy of the first and of the chosen sample on ``test`` and
``compositional`` (``shapes_kg``: on ``test``, seen objects, and ``kg_heldout``, objects known only
through the knowledge graph; a model with knowledge gets its prompts linked with the lexicon its
checkpoint carries); ``reconstruction`` scores an image tokenizer (rFID, PSNR, SSIM, LPIPS, codebook
use). Output in ``output`` (the Hydra run folder by default): ``metrics.json`` (numbers plus
everything needed to reproduce them: versions, checkpoints and extractor weights hashes, resize,
counts, seeds), ``metrics.md`` (a markdown row), ``samples.png`` / ``reconstructions.png``, and a
printed table beside the protocol's published anchors.

Several processes (``torchrun --nproc_per_node=8 -m t2i.cli.evaluate ...`` or ``srun`` with one task
per GPU) share the work: caption batch ``k`` goes to rank ``k % world_size`` (each batch seeded by its
position, so the numbers do not depend on the number of processes), metric states and the oracle's
counts are gathered on rank 0, which writes the outputs. ``autocast`` (``auto``: bf16 on CUDA, off on
the CPU; ``bf16`` | ``fp16`` | ``null``) covers sampling, decoding, CLIP and the Inception extractors.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import nullcontext
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf, open_dict
from torchvision.utils import save_image
from tqdm.auto import tqdm

from t2i.cli.common import clear_errors
from t2i.devices import pick_device
from t2i.errors import ConfigError, T2IError
from t2i.eval.generation import load_clip
from t2i.eval.processes import (  # noqa: F401 (tests and the protocols read them here)
    autocast_dtype,
    gathered,
    rank_world,
    sha256,
    slurm_to_torchrun_env,
    start_processes,
    versions,
)

log = logging.getLogger("t2i.eval")
RESIZE = ("shorter side to image_size with PIL bicubic (antialiased), centre crop; generated images are "
          "quantised to uint8; Inception resizes to 299 with TF1-style bilinear (antialias=False)")


# -- what gets evaluated ------------------------------------------------------------------------
class Items:
    """Captions of one split and, lazily, their real images (uint8 ``[n, 3, S, S]`` per slice)."""

    def __init__(self, captions, load, specs=None, skipped=None):
        self.captions, self._load, self.specs, self.skipped = captions, load, specs, skipped or {}

    def real(self, start: int, end: int) -> torch.Tensor:
        return self._load(start, end)


def shapes_items(split: str, n: int, seed: int, image_size: int, lang: str) -> Items:
    from t2i.data.shapes import make_split
    from t2i.data.transforms import to_raw

    samples = make_split(split, n, seed=seed, image_size=image_size, lang=lang)
    pixels = torch.stack([to_raw(s.image.convert('RGB')) for s in samples]).permute(0, 3, 1, 2)
    return Items([s.caption for s in samples], lambda a, b: pixels[a:b], [s.spec for s in samples])


def shapes_kg_world(p: DictConfig):
    """The Shapes-KG world of the protocol: ``eval.meta`` (a written benchmark's meta.json) when set, else
    the one ``eval.world`` (seed, n_seen, n_heldout) and ``eval.lang`` make (the data's defaults)."""
    from t2i.data.shapes_kg import make_world, world_from_meta

    if p.get("meta"):
        path = Path(str(p.meta)).expanduser()
        if not path.is_file():
            raise ConfigError(f"eval.meta={p.meta}: no such file (the meta.json `t2i-data shapes_kg` wrote)")
        return world_from_meta(path)
    w = p.get("world") or {}
    return make_world(int(w.get("seed", 0)), int(w.get("n_seen", 3)), int(w.get("n_heldout", 1)), str(p.lang))


def shapes_kg_items(split: str, n: int, seed: int, image_size: int, world) -> Items:
    from t2i.data.shapes_kg import make_split
    from t2i.data.transforms import to_raw

    samples = make_split(split, n, world, seed=seed, image_size=image_size)
    pixels = torch.stack([to_raw(s.image.convert('RGB')) for s in samples]).permute(0, 3, 1, 2)
    return Items([s.caption for s in samples], lambda a, b: pixels[a:b], [s.spec for s in samples])


def source_items(p: DictConfig, image_size: int) -> Items:
    """``num_captions`` records drawn with ``caption_seed`` from a data source, one caption each."""
    from t2i.data.formats import open_source
    from t2i.data.skips import BadSample, SkipLog
    from t2i.data.transforms import ImageTransform

    spec = p.split
    src = open_source(p.source, **dict(spec), key="eval.split") if isinstance(spec, DictConfig) else \
        open_source(p.source, str(spec), key="eval.split")
    skips = SkipLog(float(p.get("max_bad_fraction", 0.01)), name=f"eval {p.name}", key="eval.max_bad_fraction")
    records = src.records(skips)
    if not records:
        raise T2IError(f"eval.split={OmegaConf.to_container(spec) if isinstance(spec, DictConfig) else spec}: "
                       "no usable samples")
    g = torch.Generator().manual_seed(int(p.caption_seed))
    n = min(int(p.num_captions), len(records))
    if n < int(p.num_captions):
        log.warning("eval %s: %d captions asked for, the split has %d images; using all", p.name, p.num_captions, n)
    pick = torch.randperm(len(records), generator=g)[:n].tolist()
    chosen = [records[i] for i in pick]
    captions = [r.captions[int(torch.randint(len(r.captions), (), generator=g))] for r in chosen]
    transform = ImageTransform(image_size, raw=True)
    bad = {"count": 0, "examples": []}

    def load(a: int, b: int) -> torch.Tensor:
        out = []
        for r in chosen[a:b]:
            try:
                out.append(torch.as_tensor(transform(src.load(r))).permute(2, 0, 1))
            except BadSample as e:  # counted, reported, left out of the real statistics
                bad["count"] += 1
                if len(bad["examples"]) < 5:
                    bad["examples"].append(f"{e.where}: {e.reason}")
        return torch.stack(out) if out else torch.zeros(0, 3, image_size, image_size, dtype=torch.uint8)

    return Items(captions, load, skipped=bad)


# -- protocols ----------------------------------------------------------------------------------
def scores_for(cfg, clip, device, split: str, image_size: int, n: int):
    from t2i.eval.generation import build_scores
    from t2i.metrics.scores import RealStatsCache

    scores = build_scores(cfg.metrics, clip, device, seed=int(cfg.seed))
    cache = None
    if scores.frechet and cfg.metrics.get("cache_dir"):
        cache = RealStatsCache(cfg.metrics.cache_dir, dataset=cfg.eval.name, split=split, resolution=image_size,
                               n=n, caption_seed=int(cfg.eval.caption_seed), source=str(cfg.eval.get("split")),
                               extractors=scores.describe())
        state = cache.load()
        if state is not None:
            scores.load_real_state(state, rank_world()[0])  # rank 0 holds the totals, the others zeros
            log.info("real statistics from %s", cache.path)
        if rank_world()[1] > 1:
            dist.barrier()  # every rank has decided before rank 0 may write the cache file
    return scores, cache


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


def reconstruction(cfg: DictConfig, device) -> dict:
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    from t2i.eval.generation import build_scores
    from t2i.losses.perceptual import LPIPS
    from t2i.metrics.scores import to_uint8
    from t2i.pretrained.image_tokenizers import load_tokenizer

    p = cfg.eval
    if not cfg.tokenizer_ckpt:
        raise ConfigError("eval=reconstruction needs tokenizer_ckpt=<a t2i-train experiment=*_vqgan / *_dvae .ckpt>")
    tok = load_tokenizer(cfg.tokenizer_ckpt, key="tokenizer_ckpt").to(device).eval()  # also a transformer .ckpt
    size = int(p.image_size)
    items = (shapes_items(str(p.shapes_split), int(p.num_captions), int(p.caption_seed), size, "zh")
             if p.source == "shapes" else source_items(p, size))
    metrics_cfg = OmegaConf.merge(cfg.metrics, {"inception_score": False, "clip_score": False, "fd_clip": False})
    scores = build_scores(metrics_cfg, None, device, seed=int(cfg.seed))
    lpips = LPIPS(cfg.metrics.get("vgg_path")).to(device) if cfg.metrics.get("lpips", True) else None
    rank, world = rank_world()
    amp = autocast_dtype(cfg, device)  # the FID extractor only: the tokenizer and LPIPS run in float32
    amp = torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # psnr, ssim, lpips sums; images
    counts = torch.zeros(tok.codebook_size, dtype=torch.long, device=device)
    shown, t0 = [], time.perf_counter()
    bs = int(cfg.batch_size)
    batches = [a for k, a in enumerate(range(0, len(items.captions), bs)) if k % world == rank]
    for a in tqdm(batches, desc="reconstruction", disable=not cfg.progress or rank != 0):
        real = items.real(a, a + bs)
        if not len(real):
            continue
        x = real.to(device).float() / 127.5 - 1
        with torch.no_grad():
            codes = tok.encode(x)
            y = to_uint8(tok.decode(codes)).float() / 127.5 - 1  # scored as a saved PNG would be
            counts += torch.bincount(codes.flatten(), minlength=tok.codebook_size)
            x01, y01 = (x + 1) / 2, (y + 1) / 2
            totals[0] += peak_signal_noise_ratio(y01, x01, data_range=1.0, reduction="none", dim=(1, 2, 3)).sum()
            totals[1] += structural_similarity_index_measure(y01, x01, data_range=1.0, reduction="none").sum()
            if lpips is not None:
                totals[2] += lpips(y, x).sum()
            totals[3] += len(x)
            if scores.frechet:
                with amp:
                    scores.update_real(x)
                    scores.update_fake(y)
        if a < 8:  # the first 8 (original, reconstruction) pairs, whichever rank holds them
            pairs = torch.stack([x[: 8 - a], y[: 8 - a]], 1).cpu()
            shown += [(a + i, pair) for i, pair in enumerate(pairs)]
    if world > 1:
        dist.all_reduce(totals)
        dist.all_reduce(counts)
        shown = [s for part in gathered(shown) for s in part]
    n = int(totals[3])
    if n == 0:
        raise T2IError(f"eval=reconstruction: no readable images in {p.get('split')}")
    probs = counts.double() / counts.sum()
    metrics = {"psnr": float(totals[0]) / n, "ssim": float(totals[1]) / n,
               "codebook_perplexity": float(torch.exp(-(probs[probs > 0] * probs[probs > 0].log()).sum())),
               "codebook_used": int((counts > 0).sum()), "codebook_size": tok.codebook_size}
    if lpips is not None:
        metrics["lpips"] = float(totals[2]) / n
    if scores.frechet and n >= 2:
        metrics["rfid"] = scores.compute()["fid"]
    metrics.update(n=n, seconds=time.perf_counter() - t0, real_skipped=sum(gathered(items.skipped.get("count", 0))),
                   extractors=scores.describe())
    if rank == 0:
        pics = torch.cat([pair for _, pair in sorted(shown, key=lambda s: s[0])])
        from t2i.viz import sample_grid  # small images upscaled (nearest) to readable cells, framed

        save_image(sample_grid(pics, nrow=min(8, len(pics)), value_range=(-1.0, 1.0)),
                   Path(cfg.output) / "reconstructions.png")
    return {"splits": {str(p.get("shapes_split", "val")): metrics},
            "summary": {k: metrics[k] for k in ("rfid", "psnr", "ssim", "lpips") if k in metrics},
            "checkpoints": {"tokenizer": str(cfg.tokenizer_ckpt), "tokenizer_sha256": sha256(cfg.tokenizer_ckpt)},
            "protocol": {"image_size": size, "processes": world}}


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


def run(cfg: DictConfig) -> dict:
    p = cfg.eval
    if p.kind not in ("generation", "shapes", "reconstruction", "spade", "caption"):
        raise ConfigError(f"eval.kind={p.kind!r}: use generation, shapes, reconstruction, spade or caption")
    if p.kind == "spade" and not cfg.ckpt:
        raise ConfigError("eval=spade needs ckpt=<a t2i-train experiment=*_spade .ckpt>")
    if p.kind != "reconstruction" and not cfg.ckpt:
        raise ConfigError(f"eval={p.name} needs ckpt=<a t2i-train experiment=*_transformer .ckpt>")
    from t2i.data.prompts import check_output_folder
    from t2i.eval.checks import check_protocol

    check_protocol(p)
    out = check_output_folder(cfg.output)
    torch.set_flush_denormal(True)
    slurm_to_torchrun_env()
    device = pick_device(str(cfg.device))
    autocast_dtype(cfg, device)  # a bad value fails before any model loads
    out.mkdir(parents=True, exist_ok=True)
    cfg.output = str(out)
    started = start_processes(device)
    try:
        t0 = time.perf_counter()
        if p.kind == "spade":
            from t2i.eval.spade import spade  # label maps -> images

            result = spade(cfg, device)
        elif p.kind == "caption":
            from t2i.eval.captioning import captioning  # images -> captions

            result = captioning(cfg, device)
        else:
            result = reconstruction(cfg, device) if p.kind == "reconstruction" else generation(cfg, device)
        wall = time.perf_counter() - t0
        rank, world = rank_world()
        if world > 1:
            dist.barrier()
    finally:
        if started:
            dist.destroy_process_group()
    result.update(protocol_name=p.name, wall_seconds=wall, device=str(device),
                  seed=int(cfg.seed), caption_seed=int(p.caption_seed), resize=RESIZE, versions=versions(),
                  metrics_config=OmegaConf.to_container(cfg.metrics, resolve=True),
                  overrides=list(cfg.get("overrides") or []))
    result["protocol"].update(OmegaConf.to_container(p, resolve=True))
    if rank != 0:
        return result  # rank 0 writes the outputs
    (out / "metrics.json").write_text(json.dumps(result, indent=2, ensure_ascii=False, default=str))
    text = table(cfg, result["summary"])
    (out / "metrics.md").write_text(text.splitlines()[0] + "\n" + text.splitlines()[1] + "\n"
                                    + text.splitlines()[2] + "\n")
    print(f"t2i-eval {p.name}: {result['wall_seconds']:.1f} s on {device}; output in {out}\n{text}")
    return result


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
@clear_errors
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    OmegaConf.resolve(cfg)
    with open_dict(cfg):
        cfg.overrides = overrides
    run(cfg)


if __name__ == "__main__":
    main()
