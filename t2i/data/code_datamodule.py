"""CodesDataModule: stage-2 batches from the code shards of ``t2i-tokenize`` (no image decoding at all).

Batches are dicts: ``codes`` LongTensor[B, h, w], ``text`` LongTensor[B, text_len] (the text
tokenizer's ids, padded with its pad id), ``caption`` list[str], ``key`` list[str]. Training draws one
random caption per image each time the image is seen; validation and test use every (image, caption)
pair. The split is held in memory (int16 codes: 256 tokens are 512 bytes an image, so a million images
is half a gigabyte); when the shards have no ``val`` split, ``val_fraction`` of ``train`` is held out
with a seeded permutation. With knowledge (``knowledge.lexicon`` set, or code shards whose json carries entity
links: ``t2i-tokenize`` keeps the links of knowledge TSV records and linked shards) batches also have ``entities``
LongTensor[B, E] and ``entity_spans`` LongTensor[B, E, 2], as :class:`~t2i.data.datamodule.ImageTextDataModule`.
"""

from __future__ import annotations

import random

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from t2i.data.codes import image_tokenizer_spec, load_codes, read_manifest, text_tokenizer_path
from t2i.data.sampler import sample_rng, train_sampler
from t2i.data.skips import DataError
from t2i.data.tokenizer import TextTokenizer, check_same


class CodePairs(Dataset):
    def __init__(self, keys, codes, captions, every_caption: bool, links=None):
        self.keys, self.codes, self.captions = keys, codes, captions
        self.links = links if links is not None and any(x is not None for x in links) else None
        self.every_caption = every_caption
        self.index = [(i, j) for i, caps in enumerate(captions) for j in range(len(caps))] if every_caption \
            else list(range(len(keys)))

    def __len__(self):
        return len(self.index)

    def __getitem__(self, n):
        n, rng = sample_rng(n)
        if self.every_caption:
            i, j = self.index[n]
        else:
            i = n
            j = (rng or random).randrange(len(self.captions[i])) if self.captions[i] else -1
        caption = self.captions[i][j] if j >= 0 else ""
        item = {"codes": self.codes[i], "caption": caption, "key": self.keys[i]}
        if self.links is not None and self.links[i] is not None and j >= 0:
            item["links"] = self.links[i][j]
        return item


class CodeCollate:
    def __init__(self, tokenizer: TextTokenizer, text_len: int, knowledge=None):
        self.tokenizer, self.text_len, self.knowledge = tokenizer, text_len, knowledge

    def __call__(self, items):
        captions = [it["caption"] for it in items]
        batch = {"codes": torch.stack([it["codes"] for it in items]).long(),
                 "text": self.tokenizer.encode(captions, self.text_len),
                 "caption": captions, "key": [it["key"] for it in items]}
        if self.knowledge is not None:
            batch["entities"], batch["entity_spans"] = self.knowledge(
                self.tokenizer, captions, [it.get("links") for it in items], self.text_len)
        return batch


class CodesDataModule(pl.LightningDataModule):
    """``codes``: an output folder of ``t2i-tokenize``. ``tokenizer``: the text tokenizer file (default:
    the one named by the data config the codes were made from)."""

    def __init__(self, codes: str, tokenizer: str | None = None, text_len: int = 24, batch_size: int = 64,
                 num_workers: int = 0, val_fraction: float = 0.05, seed: int = 0, knowledge: dict | None = None):
        super().__init__()
        self.save_hyperparameters(logger=False)  # the run config is logged whole; module and data share key names (knowledge)
        self.manifest = read_manifest(codes)
        self.tokenizer = TextTokenizer.from_file(text_tokenizer_path(self.manifest, tokenizer), key="data.tokenizer")
        self.splits: dict[str, CodePairs] = {}
        self.knowledge = None  # a t2i.data.datamodule.KnowledgeLinks once set up, when knowledge is on

    @property
    def grid(self) -> list[int]:
        return [int(g) for g in self.manifest["grid"]]

    def has_split(self, split: str) -> bool:
        return split in self.manifest["shards"] or (split == "val" and "train" in self.manifest["shards"])

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        have = self.manifest["shards"]
        if "train" not in have and stage in (None, "fit"):
            raise DataError(f"code shards {self.hparams.codes} have no train split (have: {', '.join(have)})")
        # int16/int32 as stored: no int64 copy of the split (collate makes each batch long)
        data = {}
        for s in ("train", "val", "test"):
            if s in have:
                links: list = []
                data[s] = (*load_codes(self.hparams.codes, s, dtype=None, links=links), links)
        if "val" not in data and "train" in data and self.hparams.val_fraction > 0:
            keys, codes, caps, links = data["train"]
            perm = torch.randperm(len(keys), generator=torch.Generator().manual_seed(self.hparams.seed)).tolist()
            n_val = max(1, int(round(len(keys) * self.hparams.val_fraction)))
            val, train = perm[:n_val], perm[n_val:]
            data["val"] = ([keys[i] for i in val], codes[val], [caps[i] for i in val], [links[i] for i in val])
            data["train"] = ([keys[i] for i in train], codes[train], [caps[i] for i in train],
                             [links[i] for i in train])
        for split, (keys, codes, caps, links) in data.items():
            self.splits[split] = CodePairs(keys, codes.to(torch.int16 if codes.max() < 32768 else torch.int32), caps,
                                           every_caption=split != "train", links=links)
        from t2i.data.datamodule import knowledge_links

        stored = any(ds.links is not None for ds in self.splits.values())
        self.knowledge = knowledge_links(self.hparams.knowledge, stored)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        if split not in self.splits:
            raise DataError(f"code shards {self.hparams.codes} have no {split} split")
        ds, bs = self.splits[split], self.hparams.batch_size
        # eval loaders get their own generator too: creating an iterator then leaves the global RNG alone
        sampler, generator = train_sampler(self, ds, bs, self.hparams.seed, drop_last=True) if shuffle else \
            (None, torch.Generator().manual_seed(self.hparams.seed))
        return DataLoader(ds, batch_size=bs, sampler=sampler, generator=generator,
                          num_workers=self.hparams.num_workers,
                          collate_fn=CodeCollate(self.tokenizer, self.hparams.text_len, self.knowledge),
                          persistent_workers=self.hparams.num_workers > 0)

    def train_dataloader(self):
        return self._loader("train", True)

    def val_dataloader(self):
        return self._loader("val", False)

    def test_dataloader(self):
        return self._loader("test", False)

    def state_dict(self) -> dict:
        return {"tokenizer": self.tokenizer.to_str()}

    def load_state_dict(self, state: dict) -> None:
        if "tokenizer" in state:
            check_same(TextTokenizer.from_str(state["tokenizer"]), self.tokenizer, where="being resumed")


def stage2_info(codes: str, tokenizer: str | None = None, image_tokenizer: bool = True) -> dict:
    """What a transformer config needs from its data: ``text_vocab``, ``text_pad_id``, ``image_vocab``,
    ``image_grid`` and ``image_tokenizer``: the image tokenizer the codes were made with, as a
    :func:`t2i.pretrained.load_tokenizer` spec whose files exist here and match their recorded sha256
    (found at the recorded path or relative to the moved code folder; ``model.image_tokenizer=`` overrides)."""
    from t2i.data.specs import resolve_spec

    manifest = read_manifest(codes)
    tok = TextTokenizer.from_file(text_tokenizer_path(manifest, tokenizer), key="data.tokenizer")
    info = {"text_vocab": tok.vocab_size, "text_pad_id": tok.pad_id, "image_vocab": int(manifest["codebook_size"]),
            "image_grid": [int(g) for g in manifest["grid"]]}
    if image_tokenizer:
        info["image_tokenizer"] = resolve_spec(image_tokenizer_spec(manifest), base=manifest["path"],
                                               key="model.image_tokenizer")
    return info
