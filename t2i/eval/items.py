"""What a generation or reconstruction protocol evaluates: the captions of one split and, lazily, their real
images -- drawn from the Shapes benchmark (``shapes_items``), a Shapes-KG world (``shapes_kg_items``) or a data
source (``source_items``: ``num_captions`` records drawn with ``caption_seed``, undecodable ones counted) --
and the metric scores with their cache of real statistics (``scores_for``)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from t2i.errors import ConfigError, T2IError
from t2i.eval.processes import rank_world

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
