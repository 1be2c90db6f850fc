"""ImageTextDataModule: any supported format (or webdataset shards) -> batches of images and token ids.

A batch is a dict: ``image`` float [B, 3, S, S] in [-1, 1], ``text`` long [B, text_len] (when a
tokenizer is configured), ``caption`` list[str], ``key`` list[str]; B may be 0 when every sample
of a batch failed to decode (rare: the run stops past ``max_bad_fraction``). With knowledge (``knowledge.lexicon``
set, or records that carry stored entity links: the EasyNLP knowledge TSV, shards converted with a lexicon) a batch
also has ``entities`` long [B, E] (entity ids, -1 padding) and ``entity_spans`` long [B, E, 2] (token positions
``[start, end)`` in ``text``), E = ``knowledge.max_entities``; stored links are used as they are, other captions
are linked on the fly with the lexicon. Training draws one random
caption per image; evaluation yields every (image, caption) pair. Samples that fail to decode
are dropped from the batch and counted in ``self.logs[stage]`` (see :class:`t2i.data.skips.SkipLog`);
the :class:`t2i.callbacks.data_report.DataReport` callback prints and checks them every epoch.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from t2i.data.base import Record, Source
from t2i.data.formats import open_source
from t2i.data.sampler import sample_rng, train_sampler
from t2i.data.skips import BadSample, DataError, SkipLog
from t2i.data.streaming import StreamingPairs
from t2i.data.tokenizer import TextTokenizer, check_same
from t2i.data.transforms import ImageTransform, from_raw
from t2i.data.wds import check_tar, expand_urls, shard_has_links

log = logging.getLogger(__name__)
STAGES = ("train", "val", "test")


class CaptionedImages(Dataset):
    """Map-style dataset over indexed records: decodes lazily, returns a ``bad`` marker on failure."""

    def __init__(self, source: Source, records: list[Record], transform, every_caption: bool):
        self.source, self.records, self.transform = source, records, transform
        if every_caption:
            self.items = [(i, c) for i, r in enumerate(records) for c in range(len(r.captions))]
        else:
            self.items = [(i, -1) for i in range(len(records))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx) -> dict:
        idx, rng = sample_rng(idx)
        i, c = self.items[idx]
        rec = self.records[i]
        try:
            image = self.source.load(rec)
        except BadSample as e:
            return {"bad": (e.reason, e.where)}
        if c < 0:
            c = rng.randrange(len(rec.captions)) if rng else int(torch.randint(len(rec.captions), ()).item())
        item = {"image": self.transform(image), "caption": rec.captions[c], "key": rec.key}
        if rec.links is not None:
            item["links"] = rec.links[c]
        return item


class Collate:
    """Stack good samples, tokenize captions, carry skipped markers and truncation counts along."""

    def __init__(self, tokenizer: TextTokenizer | None, text_len: int, image_size: int, knowledge=None):
        # a private copy: its truncation counter is read per batch, the main process keeps the totals
        self.tokenizer = TextTokenizer.from_str(tokenizer.to_str()) if tokenizer is not None else None
        self.text_len, self.image_size = text_len, image_size
        self.knowledge = knowledge  # None, or a KnowledgeLinks: adds entities / entity_spans

    def __call__(self, items: list[dict]) -> dict:
        good = [x for x in items if "bad" not in x]
        batch = {
            "skipped": [x["bad"] for x in items if "bad" in x],
            "caption": [x["caption"] for x in good],
            "key": [x["key"] for x in good],
        }
        s = self.image_size  # a batch whose samples were all bad still has every key, with length 0
        batch["image"] = torch.stack([x["image"] for x in good]) if good else torch.empty(0, s, s, 3, dtype=torch.uint8)
        if self.tokenizer is not None:
            before = self.tokenizer.n_truncated
            batch["text"] = (self.tokenizer.encode(batch["caption"], self.text_len) if good
                             else torch.empty(0, self.text_len, dtype=torch.long))
            batch["n_truncated"] = self.tokenizer.n_truncated - before
            if self.knowledge is not None:
                batch["entities"], batch["entity_spans"] = self.knowledge(
                    self.tokenizer, batch["caption"], [x.get("links") for x in good], self.text_len)
        return batch


class KnowledgeLinks:
    """Entity links -> ``(entities [B, E], entity_spans [B, E, 2])`` for a batch of captions: stored links
    where a sample has them, else the lexicon's (:meth:`t2i.knowledge.EntityLexicon.link`), else none."""

    def __init__(self, lexicon=None, max_entities: int = 10):
        self.lexicon, self.max_entities = lexicon, int(max_entities)

    def __call__(self, tokenizer: TextTokenizer, captions: list[str], stored: list, text_len: int):
        from t2i.knowledge import entity_batch

        links = [s if s is not None else (self.lexicon.link(c, self.max_entities) if self.lexicon else [])
                 for c, s in zip(captions, stored)]
        return entity_batch(links, tokenizer.offsets(captions, text_len), text_len, self.max_entities)


def knowledge_links(knowledge, stored: bool, key: str = "data.knowledge") -> KnowledgeLinks | None:
    """The batch linker a data config asks for: ``knowledge.lexicon`` set, or ``stored`` links present; None
    (no knowledge keys in batches) otherwise."""
    know = dict(knowledge or {})
    path = know.get("lexicon")
    if not path and not stored:
        return None
    lexicon = None
    if path:
        from t2i.knowledge import load_lexicon

        lexicon = load_lexicon(path, key=f"{key}.lexicon")
    return KnowledgeLinks(lexicon, know.get("max_entities") or 10)


class ImageTextDataModule(pl.LightningDataModule):
    """Images + captions from ``source`` (easynlp_tsv, muge, coco_cn, folder, wds) for train/val/test.

    ``train``/``val``/``test`` are reader arguments: a path string, or a dict of keyword arguments
    (e.g. ``{root: data/muge, split: valid}``). ``val_fraction`` carves a validation split out of
    ``train`` when ``val`` is not given. ``streaming=true`` (wds only) streams shards instead of
    indexing them, after checking every shard's tar headers and end marker (``verify_shards``), since
    a cut-off or corrupt tar otherwise just ends early. ``shapes`` (a dict of :func:`t2i.data.shapes.write_shapes` arguments plus
    ``vocab_size``) builds the synthetic Shapes benchmark and its tokenizer on first use.
    """

    def __init__(
        self,
        source: str = "easynlp_tsv",
        train=None,
        val=None,
        test=None,
        tokenizer: str | None = None,
        image_size: int = 256,
        text_len: int = 64,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        persistent_workers: bool = True,
        pin_memory: bool = True,
        random_crop: bool = False,
        max_bad_fraction: float = 0.01,
        val_fraction: float = 0.0,
        streaming: bool = False,
        shuffle_buffer: int = 1000,
        epoch_length: int | None = None,
        verify_shards: bool = True,
        shapes: dict | None = None,
        knowledge: dict | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.source_name, self.splits = source, {"train": train, "val": val, "test": test}
        self.tokenizer = TextTokenizer.from_file(tokenizer, key="data.tokenizer") if tokenizer and not shapes else None
        self.logs = {s: SkipLog(max_bad_fraction, name=f"{s} data") for s in STAGES}
        self.index_logs: dict[str, SkipLog] = {}
        self.datasets: dict[str, Dataset] = {}
        self.knowledge: KnowledgeLinks | None = None

    # -- building -------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Build the Shapes benchmark (and its tokenizer) if configured and not yet on disk."""
        if self.hparams.shapes:
            prepare_shapes(self.hparams.shapes, self.hparams.tokenizer)

    def _open(self, stage: str) -> Source:
        spec = self.splits[stage]
        key = f"data.{stage}"
        if isinstance(spec, (str, Path)):
            return open_source(self.source_name, spec, key=key)
        return open_source(self.source_name, **dict(spec), key=key)

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None and self.hparams.tokenizer:
            self.tokenizer = TextTokenizer.from_file(self.hparams.tokenizer, key="data.tokenizer")
        # raw uint8 pixels through the loader; to [-1, 1] floats after the transfer (on_after_batch_transfer)
        transform_train = ImageTransform(self.hparams.image_size, self.hparams.random_crop, raw=True)
        transform_eval = ImageTransform(self.hparams.image_size, False, raw=True)
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",),
                  None: STAGES}[stage]
        if self.hparams.streaming and self.splits["val"] is None and self.hparams.val_fraction > 0:
            raise DataError("data.val_fraction needs an indexed source; with data.streaming=true give "
                            "validation shards in data.val")
        if "val" in wanted and self.splits["val"] is None and self.hparams.val_fraction > 0:
            wanted = tuple(dict.fromkeys(("train",) + wanted))
        records = {}
        stream_links = False
        for split in wanted:
            if split in self.datasets or self.splits[split] is None:
                continue
            every = split != "train"
            transform = transform_train if split == "train" else transform_eval
            if self.hparams.streaming:
                shuffle = self.hparams.shuffle_buffer if split == "train" else 0
                urls = [str(u) for u in expand_urls(self.splits[split], key=f"data.{split}")]
                for url in urls if self.hparams.verify_shards else ():  # headers only: cheap
                    problem = check_tar(url)
                    if problem:
                        raise DataError(f"data.{split}: shard {url} {problem}; rebuild it with `t2i-data convert` "
                                        "or drop it from the list (data.verify_shards=false skips this check)")
                rank, world = self._rank_world()
                if len(urls) < world:
                    raise DataError(f"data.{split}: {len(urls)} shard(s) cannot be split over {world} ranks; "
                                    "write more, smaller shards (`t2i-data convert shard_size=...`)")
                if world > 1 and split == "train" and not self.hparams.epoch_length:
                    log.warning("streaming under DDP without data.epoch_length: ranks may get different numbers "
                                "of samples and wait on each other; set data.epoch_length (samples per rank)")
                stream_links |= bool(urls) and shard_has_links(urls[0])
                self.datasets[split] = StreamingPairs(urls, transform, every, shuffle, self.hparams.epoch_length
                                                      if split == "train" else None, self.hparams.seed, rank, world)
                continue
            src = self._open(split)
            ilog = SkipLog(self.hparams.max_bad_fraction, name=f"{split} index ({src.name})")
            records[split] = (src, src.records(ilog), every, transform)
            self.index_logs[split] = ilog
            if ilog.n_bad:
                log.warning(ilog.summary())
            ilog.ok(sum(len(r.captions) for r in records[split][1]))  # readers count bad caption rows
            ilog.check()
            if not records[split][1]:
                raise DataError(f"data.{split}: no usable samples in {self.splits[split]}")
        if "train" in records and self.splits["val"] is None and self.hparams.val_fraction > 0:
            src, recs, _, _ = records["train"]
            g = torch.Generator().manual_seed(self.hparams.seed)
            perm = torch.randperm(len(recs), generator=g).tolist()
            n_val = max(1, int(len(recs) * self.hparams.val_fraction))
            records["val"] = (src, [recs[i] for i in sorted(perm[:n_val])], True, transform_eval)
            records["train"] = (src, [recs[i] for i in sorted(perm[n_val:])], False, transform_train)
        for split, (src, recs, every, transform) in records.items():
            self.datasets[split] = CaptionedImages(src, recs, transform, every)
        stored = stream_links or any(r.links is not None for ds in self.datasets.values()
                                     for r in getattr(ds, "records", ()))
        if self.knowledge is None:
            self.knowledge = knowledge_links(self.hparams.knowledge, stored)

    def _rank_world(self) -> tuple[int, int]:
        """This process's DDP rank and the world size: from the trainer, else torchrun's variables."""
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    # -- loaders ----------------------------------------------------------------------------
    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            raise DataError(f"data.{split} is not set: give the {split} split's path with `data.{split}=...`")
        ds = self.datasets[split]
        if self.knowledge is not None and self.tokenizer is None:
            raise DataError("data.knowledge: entity links need token positions; set data.tokenizer "
                            "(or data.knowledge.lexicon=null)")
        workers = self.hparams.num_workers
        bs = self.hparams.batch_size if split == "train" else (self.hparams.eval_batch_size or self.hparams.batch_size)
        # eval loaders get their own generator too: creating an iterator then leaves the global RNG alone
        sampler, generator = None, torch.Generator().manual_seed(self.hparams.seed)
        if shuffle and not isinstance(ds, IterableDataset):
            sampler, generator = train_sampler(self, ds, bs, self.hparams.seed)
        return DataLoader(
            ds,
            batch_size=bs,
            sampler=sampler,
            generator=generator,
            num_workers=workers,
            persistent_workers=self.hparams.persistent_workers and workers > 0,
            pin_memory=self.hparams.pin_memory and torch.cuda.is_available(),
            collate_fn=Collate(self.tokenizer, self.hparams.text_len, self.hparams.image_size, self.knowledge),
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.splits["val"] is None and "val" not in self.datasets:
            log.warning("no validation split (data.val unset and data.val_fraction=0): skipping validation")
            return []
        return self._loader("val", shuffle=False)

    def has_split(self, split: str) -> bool:
        return self.splits[split] is not None or split in self.datasets

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    # -- accounting (runs in the main process, after workers) --------------------------------
    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        if "image" in batch and batch["image"].dtype == torch.uint8:
            batch["image"] = from_raw(batch["image"])  # uint8 [B, S, S, 3] -> float [B, 3, S, S] in [-1, 1]
        skipped = batch.pop("skipped", [])
        n_truncated = batch.pop("n_truncated", 0)
        split = self._current_split()
        if split is not None:
            slog = self.logs[split]
            for reason, where in skipped:
                slog.skip(reason, where)
            slog.ok(len(batch["key"]))
            if self.tokenizer is not None:
                self.tokenizer.n_truncated += int(n_truncated)
                self.tokenizer.n_encoded += len(batch["key"])
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

    # -- checkpoint: the tokenizer travels with it -------------------------------------------
    def state_dict(self) -> dict:
        if self.tokenizer is None:
            return {}
        return {"tokenizer": self.tokenizer.to_str(), "tokenizer_fingerprint": self.tokenizer.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        if "tokenizer" in state and self.tokenizer is not None:
            check_same(TextTokenizer.from_str(state["tokenizer"]), self.tokenizer, where="being resumed")


def prepare_shapes(shapes, tokenizer: str | None = None) -> bool:
    """Write the Shapes benchmark ``shapes`` describes (``data.shapes``: output, counts, image_size, lang,
    seed, vocab_size) unless ``output`` already holds exactly that, and train its text ``tokenizer`` when that
    file is missing. Returns whether the benchmark was (re)built."""
    from t2i.data.shapes import write_shapes
    from t2i.data.tokenizer import train_tokenizer

    cfg = dict(shapes)
    out = Path(cfg.pop("output"))
    vocab_size = cfg.pop("vocab_size", 1000)
    cfg.setdefault("progress", False)
    meta = out / "meta.json"
    built = json.loads(meta.read_text()) if meta.exists() else None
    want = {"counts": {s: cfg.get(f"n_{s}") for s in ("train", "val", "test", "compositional")},
            "image_size": cfg.get("image_size"), "seed": cfg.get("seed"), "lang": cfg.get("lang")}
    stale = built is None or any(built.get(k) != v for k, v in want.items() if v is not None and k != "counts") or any(
        built["counts"].get(s) != n for s, n in want["counts"].items() if n is not None)
    if stale:
        log.info("%s the Shapes benchmark in %s", "rebuilding" if built else "building", out)
        write_shapes(out, **cfg)
        if tokenizer and Path(tokenizer).exists():
            Path(tokenizer).unlink()  # made from the old captions
    if tokenizer and not Path(tokenizer).exists():
        train_tokenizer(out / "shapes_train.tsv", tokenizer, vocab_size=vocab_size)
    return stale
