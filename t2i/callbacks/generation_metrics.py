"""GenerationMetrics: FID / IS / CLIPScore / FD-CLIP of generated images during training.

Every ``every_n_val_epochs`` validation epochs it takes a fixed, seeded subset of ``num_captions``
validation captions, draws ``num_candidates`` samples each with the module's sampling model
(EMA weights when present), keeps CLIP's best when a ``clip`` is configured (``rerank.backend=caption``:
the best by the caption's likelihood given the codes under that same model, no CLIP needed;
``rerank.combine=rank_sum|zsum``: by both, :mod:`t2i.pipeline.caption_rerank`), and logs
``val/fid``, ``val/is_mean``, ``val/clip_score``, ``val/fd_clip`` (whichever are configured). Under DDP
each rank draws its share of the caption batches (ranks may get different numbers) and the metric
states are summed (IS logits gathered in caption order) across ranks: the values equal one process's.

Real images come from the validation set: its images (image datamodules) or, for a codes
datamodule, the ground-truth codes decoded by the image tokenizer (``real_source=reconstructions``
in the cache key; a documented difference from FID against the original pixels). Their statistics
are computed once and cached on disk (``metrics.cache_dir``), keyed by dataset, split, resolution,
count and extractor weights. A grid with captions goes to ``<run>/images/`` and, with W&B, a table
of caption, sample and CLIP score.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
import torch

from t2i.distributed import unsharded
from t2i.eval.generation import Loop, build_scores
from t2i.metrics.scores import RealStatsCache

log = logging.getLogger(__name__)


class GenerationMetrics(pl.Callback):
    def __init__(self, every_n_val_epochs: int = 1, num_captions: int = 64, num_candidates: int = 1,
                 batch_size: int = 16, seed: int = 0, sample: dict | None = None, metrics: dict | None = None,
                 clip: dict | None = None, dataset: str | None = None, table_rows: int = 8,
                 rerank: dict | None = None):
        from t2i.errors import ConfigError
        from t2i.pipeline.caption_rerank import check_combine

        self.every = max(1, int(every_n_val_epochs))
        self.num_captions, self.num_candidates = int(num_captions), int(num_candidates)
        self.batch_size, self.seed, self.table_rows = int(batch_size), int(seed), int(table_rows)
        self.sample = dict(sample or {})
        self.metrics_cfg = dict(metrics or {"extractor": "inception", "inception_score": True})
        self.clip_cfg = dict(clip or {})
        rr, key = dict(rerank or {}), "callbacks.generation_metrics.rerank"
        self.rerank = rr.get("backend", "clip")
        if self.rerank not in ("clip", "caption"):
            raise ConfigError(f"{key}.backend={self.rerank!r}: use clip or caption (the caption's likelihood given "
                              f"the codes; a model.model.captioning=true model)")
        self.combine = check_combine(rr.get("combine"), bool(self.clip_cfg.get("ckpt")), prefix=f"{key}.",
                                     clip_keys="callbacks.generation_metrics.clip.ckpt")
        self.dataset = dataset
        self.scores = self.clip = None
        self._val_epochs = 0

    # -- pieces -----------------------------------------------------------------------------
    def _build(self, pl_module) -> None:
        if self.clip_cfg.get("ckpt"):
            from t2i.pipeline.rerank import load_reranker

            self.clip = load_reranker(self.clip_cfg["ckpt"], self.clip_cfg.get("backend", "t2i"),
                                      self.clip_cfg.get("model_name")).to(pl_module.device)
        self.scores = build_scores(self.metrics_cfg, self.clip, pl_module.device, seed=self.seed)

    def _items(self, trainer, pl_module):
        loader = trainer.val_dataloaders
        loader = loader[0] if isinstance(loader, (list, tuple)) else loader
        ds = loader.dataset
        g = torch.Generator().manual_seed(self.seed)
        picked = [ds[i] for i in torch.randperm(len(ds), generator=g)[: self.num_captions].tolist()]
        good = [it for it in picked if "bad" not in it]
        if len(good) < len(picked):
            log.warning("generation metrics: %d of %d validation samples unreadable, skipped",
                        len(picked) - len(good), len(picked))
        captions = [it["caption"] for it in good]
        if good and "image" in good[0]:
            pixels = torch.stack([torch.as_tensor(it["image"]) for it in good])
            pixels = pixels.permute(0, 3, 1, 2) if pixels.shape[-1] == 3 else ((pixels + 1) * 127.5).round().byte()
            return captions, (lambda a, b: pixels[a:b]), "images", pixels.shape[-1]
        from t2i.sampling import decode_codes

        codes = torch.stack([torch.as_tensor(it["codes"]) for it in good]).long()
        tok = pl_module.image_tokenizer
        size = tok.downsample * codes.shape[-1]
        return captions, (lambda a, b: decode_codes(tok, codes[a:b])), "reconstructions", size

    # -- hooks ------------------------------------------------------------------------------
    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self._val_epochs += 1
        if (self._val_epochs - 1) % self.every or getattr(pl_module, "image_tokenizer", None) is None:
            return
        if self.scores is None:
            self._build(pl_module)
        plain = unsharded(trainer, pl_module, everywhere=True)  # itself unless FSDP shards it
        captions, real, source, size = self._items(trainer, plain)
        cache = None
        if self.scores.frechet and self.metrics_cfg.get("cache_dir") and not self.scores.real_loaded:
            dm = trainer.datamodule
            hp = getattr(dm, "hparams", {}) or {}
            name = self.dataset or f"{type(dm).__name__}:{hp.get('val') or hp.get('codes') or ''}"
            cache = RealStatsCache(self.metrics_cfg['cache_dir'], dataset=name, split="val", resolution=size,
                                   n=len(captions), caption_seed=self.seed, real_source=source,
                                   extractors=self.scores.describe())
            state = cache.load()
            if state is not None:
                self.scores.load_real_state(state, trainer.global_rank)
        tokenizer = trainer.datamodule.tokenizer
        model = plain.sampling_model()
        if self.rerank == "caption" or self.combine:
            from t2i.pipeline.caption_rerank import check_captioning

            check_captioning(model, "the model (callbacks.generation_metrics.rerank)")
        loop = Loop(model, plain.image_tokenizer, lambda caps: tokenizer.encode(caps, model.text_len),
                    self.scores, self.clip, self.num_candidates, self.batch_size, self.seed, self.sample,
                    trainer.global_rank, trainer.world_size, keep=self.table_rows, rerank=self.rerank,
                    combine=self.combine)
        out = loop.run(captions, real if not self.scores.real_loaded else None)
        if not self.scores.real_loaded:
            if cache is not None:
                state = self.scores.real_state()  # collective under DDP
                if trainer.is_global_zero:
                    cache.save(state)
            self.scores.real_loaded = True  # in memory from now on (each rank keeps its share)
        values = self.scores.compute()
        self.scores.reset()
        for k, v in values.items():  # already equal on every rank; the mean of equal values keeps them (and Lightning quiet)
            pl_module.log(f"val/{k}", v, sync_dist=True)
        if trainer.is_global_zero and out["images"] is not None:
            self._save(trainer, out, values)

    def _save(self, trainer, out, values) -> None:
        from torchvision.utils import save_image

        from t2i.viz import captioned_rows

        rows = out["records"][: len(out["images"])]
        captions = [r["caption"] for r in rows]
        path = Path(trainer.default_root_dir) / "images" / f"val_epoch{trainer.current_epoch:03d}_generations.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image((captioned_rows(out["images"], captions, per_row=1)[0] + 1) / 2, path)
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                import wandb

                data = [[r["caption"], wandb.Image(((img.float() + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy()),
                         r["clip_score"]] for r, img in zip(rows, out["images"])]
                logger.log_table(key="val/generations", columns=["caption", "sample", "clip_score"], data=data,
                                 step=trainer.global_step)
