"""``LabelMapDataModule``: any label-map source as batches of images, label maps and instance maps."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from t2i.data.layouts.shapes import (
    LAYOUT_SPLITS,
    NUM_LAYOUT_CLASSES,
    LayoutSpec,
    read_specs,
    write_shapes_layout,
)
from t2i.data.layouts.sources import (
    SOURCES,
    STAGES,
    LabelFolder,
    LayoutSkipLog,
    Pair,
    fit_pair,
    open_label_source,
)
from t2i.data.sampler import sample_rng, train_sampler
from t2i.data.skips import BadSample, DataError, SkipLog
from t2i.errors import ConfigError

log = logging.getLogger(__name__)


class LabelMapPairs(Dataset):
    """Map-style dataset of (image, label map[, instance map]) pairs; a failed pair returns a ``bad`` marker."""

    def __init__(self, source: LabelFolder, pairs: list[Pair], height: int, width: int, train: bool,
                 flip: bool = True, random_crop: bool = True):
        self.source, self.pairs = source, pairs
        self.height, self.width, self.train, self.flip, self.random_crop = height, width, train, flip, random_crop

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, idx) -> dict:
        idx, rng = sample_rng(idx)
        if rng is None and self.train:
            import random

            rng = random.Random(int(torch.randint(2**31, ()).item()))
        pair = self.pairs[idx]
        try:
            image, label, instance = self.source.load(pair)
        except BadSample as e:
            return {"bad": (e.reason, e.where)}
        crop_rng = rng if (self.train and self.random_crop) else None
        img, (label, instance) = fit_pair(image, [label, instance], self.height, self.width, crop_rng,
                                          flip=self.train and self.flip)
        if self.train and not self.random_crop and self.flip and rng is not None and rng.random() < 0.5:
            img, label = np.ascontiguousarray(img[:, ::-1]), np.ascontiguousarray(label[:, ::-1])
            instance = None if instance is None else np.ascontiguousarray(instance[:, ::-1])
        item = {"image": torch.from_numpy(img), "label": torch.from_numpy(label), "key": pair.key}
        if instance is not None:
            item["instance"] = torch.from_numpy(instance)
        return item


def collate_pairs(items: list[dict]) -> dict:
    good = [x for x in items if "bad" not in x]
    batch = {"skipped": [x["bad"] for x in items if "bad" in x], "key": [x["key"] for x in good]}
    if good:
        batch["image"] = torch.stack([x["image"] for x in good])  # uint8 [B, H, W, 3]
        batch["label"] = torch.stack([x["label"] for x in good]).long()
        if all("instance" in x for x in good):
            batch["instance"] = torch.stack([x["instance"] for x in good]).long()
    else:
        batch["image"] = torch.empty(0, 1, 1, 3, dtype=torch.uint8)
        batch["label"] = torch.empty(0, 1, 1, dtype=torch.long)
    return batch


def image_hw(image_size, aspect_ratio: float = 1.0) -> tuple[int, int]:
    """(height, width) from ``image_size`` (the height) and ``aspect_ratio`` (width / height)."""
    h = int(image_size)
    return h, int(round(h * float(aspect_ratio)))


class LabelMapDataModule(pl.LightningDataModule):
    """Label-map + image batches from ``source`` (shapes_layout, ade20k, coco_stuff, cityscapes, label_folder).

    ``train`` / ``val`` / ``test``: a split name under ``root`` (``train``, ``val``, ...), a dict of reader
    arguments, or null. ``num_classes`` must cover the reader's ids (ids past it are skipped as
    ``label_out_of_range``); ``has_instances`` adds ``batch["instance"]`` (a reader without instance maps is a
    config error). ``shapes_layout`` (a dict of :func:`write_shapes_layout` arguments with ``output``) builds the
    Shapes layouts on first use under ``root``. Skips are counted per split in ``self.logs`` (the
    :class:`~t2i.callbacks.data_report.DataReport` callback reports and checks them every epoch).
    """

    def __init__(self, source: str = "shapes_layout", root=None, train="train", val="val", test="test",
                 image_size: int = 64, aspect_ratio: float = 1.0, num_classes: int = NUM_LAYOUT_CLASSES,
                 has_instances: bool = False, batch_size: int = 16, eval_batch_size: int | None = None,
                 num_workers: int = 2, persistent_workers: bool = True, pin_memory: bool = True,
                 random_flip: bool = True, random_crop: bool = True, max_bad_fraction: float = 0.01,
                 instance_dir=None, shapes_layout: dict | None = None, seed: int = 0):
        super().__init__()
        self.save_hyperparameters(logger=False)
        if source not in SOURCES:
            raise ConfigError(f"data.source={source!r}: use one of {', '.join(SOURCES)}")
        self.splits = {"train": train, "val": val, "test": test}
        self.height, self.width = image_hw(image_size, aspect_ratio)
        self.logs = {s: LayoutSkipLog(max_bad_fraction, name=f"{s} data") for s in STAGES}
        self.index_logs: dict[str, SkipLog] = {}
        self.datasets: dict[str, LabelMapPairs] = {}
        self.specs: dict[str, LayoutSpec] = {}  # shapes_layout: key -> its objects (the oracle's ground truth)
        self.tokenizer = None

    # -- building -------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Write the Shapes layouts (``shapes_layout`` set) unless the same ones are already on disk."""
        cfg = self.hparams.shapes_layout
        if not cfg or self.hparams.source != "shapes_layout":
            return
        cfg = dict(cfg)
        out = Path(str(cfg.pop("output", None) or self.hparams.root))
        cfg.setdefault("progress", False)
        meta = out / "meta.json"
        built = json.loads(meta.read_text()) if meta.exists() else None
        want = {"counts": {s: cfg.get(f"n_{s}") for s in LAYOUT_SPLITS}, "image_size": cfg.get("image_size"),
                "seed": cfg.get("seed"), "min_objects": cfg.get("min_objects"), "max_objects": cfg.get("max_objects"),
                "sizes": list(cfg["sizes"]) if cfg.get("sizes") is not None else None}
        stale = built is None or any(built.get(k) != v for k, v in want.items() if v is not None and k != "counts") \
            or any(built["counts"].get(s) != n for s, n in want["counts"].items() if n is not None)
        if stale:
            log.info("%s the Shapes layouts in %s", "rebuilding" if built else "building", out)
            write_shapes_layout(out, **cfg)

    def _open(self, split: str) -> LabelFolder:
        extra = {}
        if self.hparams.instance_dir and self.hparams.source == "coco_stuff":
            extra["instance_dir"] = self.hparams.instance_dir
        if self.hparams.source == "cityscapes":
            extra["instances"] = bool(self.hparams.has_instances)
        src = open_label_source(self.hparams.source, self.hparams.root, self.splits[split], key="data.root",
                                **extra)
        if src.num_classes > self.hparams.num_classes:
            raise ConfigError(f"data.num_classes={self.hparams.num_classes} but {src.name} has {src.num_classes} "
                              f"classes; set data.num_classes={src.num_classes}")
        src.num_classes = int(self.hparams.num_classes)
        if self.hparams.has_instances and src.instance_dir is None:
            raise ConfigError(f"data.has_instances=true but {src.name} has no instance maps here "
                              "(coco_stuff: set data.instance_dir; or data.has_instances=false)")
        return src

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",),
                  None: STAGES}[stage]
        for split in wanted:
            if split in self.datasets or self.splits[split] is None:
                continue
            src = self._open(split)
            ilog = LayoutSkipLog(self.hparams.max_bad_fraction, name=f"{split} index ({src.name})")
            pairs = src.pairs(ilog)
            ilog.ok(len(pairs))
            self.index_logs[split] = ilog
            if ilog.n_bad:
                log.warning(ilog.summary())
            ilog.check()
            if not pairs:
                raise DataError(f"data.{split}: no image + label-map pairs in {src.image_dir}")
            self.datasets[split] = LabelMapPairs(src, pairs, self.height, self.width, train=split == "train",
                                                 flip=self.hparams.random_flip, random_crop=self.hparams.random_crop)
            if self.hparams.source == "shapes_layout":
                specs = src.image_dir.parent / "specs.jsonl"
                if specs.is_file():
                    self.specs.update(read_specs(specs))

    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    # -- loaders -----------------------------------------------------------------------------------
    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            raise DataError(f"data.{split} is not set: give the {split} split with `data.{split}=...`")
        ds = self.datasets[split]
        bs = self.hparams.batch_size if split == "train" else (self.hparams.eval_batch_size or self.hparams.batch_size)
        sampler, generator = None, torch.Generator().manual_seed(self.hparams.seed)
        if shuffle:
            sampler, generator = train_sampler(self, ds, bs, self.hparams.seed)
        workers = self.hparams.num_workers
        return DataLoader(ds, batch_size=bs, sampler=sampler, generator=generator, num_workers=workers,
                          persistent_workers=self.hparams.persistent_workers and workers > 0,
                          pin_memory=self.hparams.pin_memory and torch.cuda.is_available(),
                          collate_fn=collate_pairs, drop_last=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        if "val" not in self.datasets:
            log.warning("no validation split (data.val unset): skipping validation")
            return []
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def has_split(self, split: str) -> bool:
        return self.splits[split] is not None or split in self.datasets

    # -- accounting ----------------------------------------------------------------------------
    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        batch = finish_batch(batch)
        skipped = batch.pop("skipped", [])
        split = self._current_split()
        if split is not None:
            slog = self.logs[split]
            for reason, where in skipped:
                slog.skip(reason, where)
            slog.ok(len(batch["key"]))
        return batch

    def _current_split(self) -> str | None:
        trainer = self.trainer
        if trainer is None or trainer.sanity_checking:
            return None
        if trainer.training:
            return "train"
        if trainer.validating:
            return "val"
        if trainer.testing:
            return "test"
        return None


def finish_batch(batch: dict) -> dict:
    """uint8 [B, H, W, 3] images -> float [B, 3, H, W] in [-1, 1] (on the batch's device)."""
    from t2i.data.transforms import from_raw

    if batch["image"].dtype == torch.uint8:
        batch["image"] = from_raw(batch["image"])
    return batch
