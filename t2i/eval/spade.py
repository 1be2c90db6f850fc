"""``t2i-eval eval=spade``: a SPADE checkpoint's images from label maps, scored (issue 21).

    t2i-eval eval=spade ckpt=<shapes_spade .ckpt>
    t2i-eval eval=spade ckpt=<ade20k_spade .ckpt> eval.data=ade20k eval.root=data/ADEChallengeData2016 \
        eval.split=val eval.seg.ckpt=deeplab_ade20k.pth

``num_maps`` maps of a split (Shapes layouts rendered fresh at the model's size with ``map_seed``; a real dataset's
pairs drawn with ``map_seed``), ``num_styles`` images each (``style``: null = the prior's mean, random = N(0, I)
draws with seeds ``seed + k``). Scores:

* FID of the first style's images against the split's real images (our extractor; real statistics cached under
  ``metrics.cache_dir``, keyed by dataset, root, split, size, count, seed and extractor weights), FD-CLIP when
  ``clip.ckpt`` is given;
* layout fidelity: on Shapes layouts the oracle (:func:`t2i.data.oracle.layout_accuracy`: colour, shape and
  position of every object; ``all`` = every object of an image right), per style; on a real dataset the mIoU
  (and pixel accuracy) of a user-supplied segmentation network (``seg``) on the generated images and, as the
  reference it cannot beat, on the real ones;
* ``diversity_l1`` (num_styles > 1): the mean absolute pixel difference ([-1, 1] scale) between two styles of one
  map, averaged over maps and style pairs.

One process (under torchrun every rank would repeat the work: it is refused).
"""

from __future__ import annotations

import logging
import time
from itertools import combinations
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torchvision.utils import save_image
from tqdm.auto import tqdm

from t2i.errors import ConfigError, T2IError

log = logging.getLogger("t2i.eval")


class MapItems:
    """``n`` label maps with their real images (uint8 [n, 3, H, W]) and, for Shapes layouts, their specs."""

    def __init__(self, labels, real, instances=None, specs=None, keys=None, skipped=None):
        self.labels, self.real, self.instances, self.specs = labels, real, instances, specs
        self.keys, self.skipped = keys, skipped or {}


def shapes_layout_items(p: DictConfig, size: tuple[int, int]) -> MapItems:
    from t2i.data.layouts import make_layouts
    from t2i.data.transforms import to_raw

    if size[0] != size[1]:
        raise ConfigError(f"eval.data=shapes_layout renders square maps; this model makes {size[0]}x{size[1]}")
    samples = make_layouts(str(p.split), int(p.num_maps), seed=int(p.map_seed), image_size=size[0],
                           min_objects=int(p.min_objects), max_objects=int(p.max_objects),
                           sizes=tuple(p.get("sizes") or ("large",)))
    labels = torch.stack([torch.from_numpy(s.label.astype("int64")) for s in samples])
    real = torch.stack([to_raw(s.image) for s in samples]).permute(0, 3, 1, 2)
    return MapItems(labels, real, specs=[s.spec for s in samples], keys=[s.key for s in samples])


def dataset_items(p: DictConfig, size: tuple[int, int], num_classes: int, use_instance: bool) -> MapItems:
    """``num_maps`` pairs of a label-map dataset drawn with ``map_seed``; image and map centre-cropped to
    the model's size (NEAREST for maps). Bad pairs are skipped, counted and reported."""
    from t2i.data.layouts import LayoutSkipLog, fit_pair, open_label_source
    from t2i.data.skips import BadSample

    extra = {"instances": bool(use_instance)} if p.data == "cityscapes" else {}
    if p.get("instance_dir") and p.data == "coco_stuff":
        extra["instance_dir"] = p.instance_dir
    src = open_label_source(str(p.data), p.get("root"), OmegaConf.to_container(p.split) if isinstance(
        p.split, DictConfig) else p.split, key="eval.root", **extra)
    if src.num_classes > num_classes:
        raise ConfigError(f"eval.data={p.data} has {src.num_classes} classes; the model knows {num_classes}")
    src.num_classes = num_classes
    slog = LayoutSkipLog(float(p.get("max_bad_fraction", 0.01)), name=f"eval spade {p.data}",
                         key="eval.max_bad_fraction")
    pairs = src.pairs(slog)
    if not pairs:
        raise T2IError(f"eval.data={p.data} eval.root={p.get('root')}: no image + label-map pairs")
    g = torch.Generator().manual_seed(int(p.map_seed))
    order = torch.randperm(len(pairs), generator=g).tolist()
    labels, real, insts, keys = [], [], [], []
    for i in order:
        if len(labels) >= int(p.num_maps):
            break
        try:
            image, label, inst = src.load(pairs[i])
        except BadSample as e:
            slog.skip(e.reason, e.where)
            continue
        pixels, (label, inst) = fit_pair(image, [label, inst], size[0], size[1])
        slog.ok()
        labels.append(torch.from_numpy(label))
        real.append(torch.from_numpy(pixels).permute(2, 0, 1))
        insts.append(torch.from_numpy(inst) if inst is not None else None)
        keys.append(pairs[i].key)
    slog.ok(len(pairs) - len(order))  # never loaded: counted as indexed fine
    if slog.n_bad:
        log.warning(slog.summary())
    slog.check()
    if len(labels) < int(p.num_maps):
        log.warning("eval spade: %d maps asked for, %d usable", p.num_maps, len(labels))
    instances = torch.stack(insts) if use_instance else None
    return MapItems(torch.stack(labels), torch.stack(real), instances, keys=keys, skipped=slog.to_dict())


def spade(cfg: DictConfig, device) -> dict:
    from t2i.data.oracle import layout_accuracy
    from t2i.eval.generation import build_scores, load_clip
    from t2i.eval.processes import rank_world, sha256
    from t2i.metrics.scores import RealStatsCache
    from t2i.pipeline.spade import colorize_map, load_spade, model_size

    p = cfg.eval
    if rank_world()[1] > 1:
        raise ConfigError("eval=spade runs in one process (start it without torchrun / srun)")
    for key in ("num_maps", "num_styles"):
        v = p[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"eval.{key}={v} must be an integer >= 1")
    style = p.get("style")
    if style not in (None, "random"):
        raise ConfigError(f"eval.style={style!r}: use null (the prior's mean) or random")
    seg_cfg = p.get("seg") or {}
    use_seg = bool(seg_cfg.get("enabled", True)) and (p.data != "shapes_layout" or seg_cfg.get("ckpt"))
    seg = None
    if use_seg:
        from t2i.metrics.segmentation import load_segmenter

        seg = load_segmenter(OmegaConf.to_container(seg_cfg, resolve=True) if isinstance(seg_cfg, DictConfig)
                             else seg_cfg, device)  # a missing network fails before the generator loads
    module = load_spade(cfg.ckpt, device)
    size = model_size(module) or (int(p.image_size),) * 2
    num_classes, use_instance = int(module.num_classes), bool(getattr(module, "use_instance", False))
    items = shapes_layout_items(p, size) if p.data == "shapes_layout" else \
        dataset_items(p, size, num_classes, use_instance)
    if int(items.labels.max()) >= num_classes:
        raise ConfigError(f"eval.data={p.data}: class ids up to {int(items.labels.max())}, the model knows "
                          f"0..{num_classes - 1}")
    clip = load_clip(cfg, device)
    metrics_cfg = OmegaConf.merge(cfg.metrics, {"clip_score": False})  # no captions here
    scores = build_scores(metrics_cfg, clip, device, seed=int(cfg.seed))
    n = len(items.labels)
    cache = None
    if scores.frechet and cfg.metrics.get("cache_dir"):
        cache = RealStatsCache(cfg.metrics.cache_dir, dataset=f"spade_{p.data}", split=str(p.split),
                               resolution=f"{size[0]}x{size[1]}", n=n, map_seed=int(p.map_seed),
                               source=str(p.get("root")) if p.data != "shapes_layout" else
                               f"objects {p.min_objects}-{p.max_objects} sizes {list(p.get('sizes') or [])}",
                               extractors=scores.describe())
        state = cache.load()
        if state is not None:
            scores.load_real_state(state)
            log.info("real statistics from %s", cache.path)
    k_styles = 1 if style is None else int(p.num_styles)
    bs = int(cfg.batch_size)
    fakes = torch.empty(n, k_styles, 3, *size, dtype=torch.uint8)
    t0 = time.perf_counter()
    bar = tqdm(total=n * k_styles, desc=f"{p.name} {p.data} {p.split}", disable=not cfg.progress)
    seg_fake = seg_real = None
    if seg is not None:
        from t2i.metrics.segmentation import ConfusionMatrix, segment

        ignore = seg_cfg.get("ignore_index", 0)
        seg_fake, seg_real = ConfusionMatrix(num_classes, ignore), ConfusionMatrix(num_classes, ignore)
        seg_args = dict(mean=tuple(seg_cfg.get("mean") or (0.485, 0.456, 0.406)),
                        std=tuple(seg_cfg.get("std") or (0.229, 0.224, 0.225)), input_size=seg_cfg.get("input_size"),
                        pred_offset=int(seg_cfg.get("pred_offset", 0)))
    for k in range(k_styles):
        gen = torch.Generator(device=device).manual_seed(int(cfg.seed) + k) if style == "random" else None
        for a in range(0, n, bs):
            lab = items.labels[a:a + bs].to(device)
            inst = items.instances[a:a + bs].to(device) if items.instances is not None else None
            with torch.no_grad():
                y = module.generate(lab, instance=inst, style=style, generator=gen).float()
            y8 = ((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()  # scored as saved PNGs
            fakes[a:a + len(lab), k] = y8
            if k == 0:
                yq = y8.to(device).float() / 127.5 - 1
                real = items.real[a:a + bs].to(device).float() / 127.5 - 1
                if scores.frechet:
                    if not scores.real_loaded:
                        scores.update_real(real)
                    scores.update_fake(yq)
                if seg is not None:
                    seg_fake.update(segment(seg, yq, size, **seg_args), lab)
                    seg_real.update(segment(seg, real, size, **seg_args), lab)
            bar.update(len(lab))
    bar.close()
    if cache is not None and not scores.real_loaded:
        cache.save(scores.real_state())
    metrics = scores.compute() if scores.frechet or scores.inception_score else {}
    if items.specs is not None:
        per_style = [layout_accuracy(fakes[:, k].permute(0, 2, 3, 1).numpy(), list(items.labels.numpy()))
                     for k in range(k_styles)]
        metrics["layout"] = per_style[0]
        metrics["layout_per_style"] = [s["all"] for s in per_style]
        metrics["layout_real"] = layout_accuracy(items.real.permute(0, 2, 3, 1).numpy(), list(items.labels.numpy()))
    if seg is not None:
        metrics["seg_fake"], metrics["seg_real"] = seg_fake.compute(), seg_real.compute()
        metrics["miou"], metrics["miou_real"] = metrics["seg_fake"]["miou"], metrics["seg_real"]["miou"]
    if k_styles > 1:
        f = fakes.float() / 127.5 - 1
        pairs = list(combinations(range(k_styles), 2))
        metrics["diversity_l1"] = float(sum((f[:, i] - f[:, j]).abs().mean() for i, j in pairs) / len(pairs))
    metrics.update(n=n, num_styles=k_styles, seconds=time.perf_counter() - t0, real_from_cache=scores.real_loaded,
                   real_cache=str(cache.path) if cache else None, extractors=scores.describe(),
                   skipped=items.skipped)
    show = min(8, n)
    cells = torch.cat([colorize_map(items.labels[:show], num_classes)[:, None],
                       (items.real[:show].float() / 127.5 - 1)[:, None],
                       fakes[:show].float() / 127.5 - 1], 1)
    from t2i.viz import sample_grid

    save_image(sample_grid(cells.flatten(0, 1), nrow=cells.shape[1], value_range=(-1.0, 1.0)),
               Path(cfg.output) / "samples.png")
    summary = {k: metrics[k] for k in ("fid", "fd_clip", "is_mean", "miou", "miou_real", "diversity_l1")
               if k in metrics}
    if "layout" in metrics:
        summary["layout_all"] = metrics["layout"]["all"]
        summary["layout_objects"] = metrics["layout"]["objects"]
    return {"splits": {str(p.split): metrics}, "summary": summary,
            "checkpoints": {"spade": str(cfg.ckpt), "spade_sha256": sha256(cfg.ckpt),
                            "seg": seg_cfg.get("ckpt") if seg is not None else None,
                            "seg_sha256": sha256(seg_cfg.get("ckpt")) if seg is not None else None,
                            "clip": cfg.clip.ckpt and str(cfg.clip.ckpt), "clip_sha256": sha256(cfg.clip.ckpt)},
            "protocol": {"image_size": list(size), "processes": 1, "style": style}}
