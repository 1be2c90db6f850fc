"""TransformerModule: trains :class:`t2i.models.transformer.Transformer` on (caption, image codes) pairs.

Batches come from :class:`t2i.data.code_datamodule.CodesDataModule` (``codes`` from ``t2i-tokenize``,
the fast path) or from :class:`t2i.data.datamodule.ImageTextDataModule` (``image``), which a frozen
image tokenizer (``image_tokenizer``) encodes on the fly. The loss is DALL·E's weighted mean
``(w_text * L_text + w_img * L_img) / (w_text + w_img)``; with ``cond_drop_prob`` the caption is
replaced by the null caption (all pads) so the model also learns the unconditional distribution that
classifier-free guidance needs. ``model.text_vocab``, ``text_pad_id``, ``image_vocab`` and
``image_grid`` left null are read from the code shards' manifest and the text tokenizer; the filled-in
values are saved as hyper-parameters, so a checkpoint rebuilds the model without the data.

``caption_loss_weight`` (with ``model.captioning=true``): the image -> text direction trains on the same
batches, ``loss = t2i loss + caption_loss_weight * caption loss``; ``text_loss_weight = image_loss_weight = 0``
trains captioning alone. A weight of 0 skips the captioning pass entirely, so the text -> image path trains
exactly as in a model without the direction.

``knowledge`` (ARTIST): ``{enabled, lexicon, vectors, trainable, fusion, max_entities}``. When enabled,
the first build reads the entity lexicon (its size is the entity table's) and the vectors file into the
model's table; batches then carry ``entities`` / ``entity_spans`` (the data config links captions with
the same lexicon). The lexicon travels in the checkpoint (``t2i_entity_lexicon``) so prompts are linked
at generation time without the file. Disabled, the model has no knowledge layer and ignores the links.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn

from t2i.data.specs import SPEC_HINT
from t2i.distributed import batch_share
from t2i.errors import ConfigError
from t2i.keys import LEXICON_KEY
from t2i.lit.optim import GuardedSteps, StepGuard, adamw_warmup_cosine, ema_update, live_loss
from t2i.models.transformer import Transformer

log = logging.getLogger(__name__)
INFERRED = ("text_vocab", "text_pad_id", "image_vocab", "image_grid")


def no_decay(name: str, p: nn.Parameter) -> bool:
    """Biases, norms, embeddings and position tables take no weight decay."""
    return p.ndim < 2 or "emb" in name or "pos" in name or ".ln" in name or name.startswith("ln")


class TransformerModule(GuardedSteps, pl.LightningModule):
    bad_step_hint = "lower model.lr, raise model.warmup_steps, or try model.model.sandwich_ln=true / pb_relax=true"

    def __init__(self, model: dict, codes: str | None = None, text_tokenizer: str | None = None,
                 image_tokenizer: str | None = None, text_loss_weight: float = 1.0, image_loss_weight: float = 7.0,
                 cond_drop_prob: float = 0.0, lr: float = 3e-4, betas=(0.9, 0.95), weight_decay: float = 0.01,
                 warmup_steps: int = 0, schedule: str = "cosine", total_steps: int | None = None,
                 min_lr_ratio: float = 0.1, grad_clip: float | None = 1.0, ema_decay: float | None = None,
                 max_bad_steps: int = 20, sample: dict | None = None, image_size: int | None = None,
                 knowledge: dict | None = None, caption_loss_weight: float = 0.0):
        super().__init__()
        model, info = dict(model), None
        vectors, self.lexicon = self._knowledge(model, knowledge)
        if any(model.get(k) is None for k in INFERRED):  # the first build (not a rebuild from a checkpoint)
            info = self._infer_sizes(codes, text_tokenizer, image_tokenizer, image_size)
            for k in INFERRED:
                model[k] = info[k] if model.get(k) is None else model[k]
            image_tokenizer = info["image_tokenizer"]  # files checked here, recorded as absolute paths
        if schedule not in ("constant", "cosine"):
            raise ConfigError(f"model.schedule={schedule!r} is unknown; use constant or cosine")
        self.save_hyperparameters()  # reads the locals now: the filled-in model sizes, the tokenizer path
        self.model = Transformer(**model)
        if vectors is not None:
            with torch.no_grad():
                self.model.knowledge.table.copy_(vectors)
        self.ema = None
        if ema_decay:
            self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self._image_tokenizer = None  # [module]: built on first use, not a submodule (not in state_dict)
        self._image_tokenizer_record = None  # the tokenizer carried by the checkpoint this module was loaded from
        if info is not None and image_tokenizer:  # first build: a tokenizer that cannot load fails now, not later
            tok = info.get("built") or self._load_image_tokenizer(image_tokenizer, check_hash=False)  # just hashed
            if tok.codebook_size != self.model.image_vocab:
                raise ConfigError(f"model.image_tokenizer has {tok.codebook_size} codes; the transformer is set up "
                                  f"for {self.model.image_vocab} (the code shards' codebook): pass the tokenizer "
                                  "the codes were made with")
            self._image_tokenizer = [tok]
        self.guard = StepGuard(max_bad_steps)

    @staticmethod
    def _knowledge(model: dict, knowledge: dict | None):
        """First build with ``knowledge.enabled``: the entity table's size from the lexicon, its rows from the
        vectors file -> ``(vectors, lexicon)``; the sizes go into ``model["knowledge"]``. A rebuild from a
        checkpoint has them already (the lexicon then comes from the checkpoint)."""
        if not knowledge or not knowledge.get("enabled"):
            model.pop("knowledge", None)
            return None, None
        if model.get("knowledge"):
            return None, None
        from t2i.knowledge.lexicon import EntityLexicon
        from t2i.knowledge.vectors import load_vectors

        if not knowledge.get("lexicon") or not knowledge.get("vectors"):
            raise ConfigError("model.knowledge.enabled=true needs model.knowledge.lexicon (entity2id.txt) and "
                              "model.knowledge.vectors (entity2vec.pt / .npy / text), e.g. from `t2i-knowledge train`")
        lexicon = EntityLexicon.from_file(knowledge["lexicon"], key="model.knowledge.lexicon")
        vectors = load_vectors(knowledge["vectors"], num_ids=lexicon.num_ids, key="model.knowledge.vectors")
        model["knowledge"] = {"num_entities": int(vectors.shape[0]), "dim": int(vectors.shape[1]),
                              "trainable": bool(knowledge.get("trainable", False)),
                              "fusion": str(knowledge.get("fusion", "input"))}
        return vectors, lexicon

    def entities(self, batch: dict):
        """The batch's linked entities for a model with knowledge, else None."""
        if self.model.knowledge is None or "entities" not in batch:
            return None
        return batch["entities"], batch["entity_spans"]

    @staticmethod
    def _infer_sizes(codes, text_tokenizer, image_tokenizer, image_size) -> dict:
        """Sizes from the code shards' manifest, or (images encoded on the fly) from the image tokenizer,
        ``image_size`` and the text tokenizer file; plus ``image_tokenizer``: the stage-1 tokenizer as a
        spec of existing, hash-checked files (the codes' own unless ``model.image_tokenizer`` is set)."""
        from t2i.data.specs import resolve_spec
        from t2i.pretrained.image_tokenizers import tokenizer_spec

        def checked(source):
            if isinstance(source, Mapping):
                return resolve_spec(source, key="model.image_tokenizer")
            if not Path(str(source)).expanduser().is_file():
                raise ConfigError(f"model.image_tokenizer={source}: no such file (a tokenizer .ckpt from "
                                  f"`t2i-train experiment=*_vqgan` or *_dvae, or for public weights {SPEC_HINT})")
            return tokenizer_spec("t2i", source, names={"ckpt": "model.image_tokenizer"})

        if codes:
            from t2i.data.code_datamodule import stage2_info

            info = stage2_info(codes, text_tokenizer, image_tokenizer=not image_tokenizer)
            if image_tokenizer:
                info["image_tokenizer"] = checked(image_tokenizer)
            return info
        if image_tokenizer and image_size and text_tokenizer:
            from t2i.data.tokenizer import TextTokenizer

            spec = checked(image_tokenizer)
            tok = TextTokenizer.from_file(text_tokenizer, key="model.text_tokenizer")
            image_tok = TransformerModule._load_image_tokenizer(spec, check_hash=False)
            side = int(image_size) // image_tok.downsample
            return {"text_vocab": tok.vocab_size, "text_pad_id": tok.pad_id, "image_vocab": image_tok.codebook_size,
                    "image_grid": [side, side], "image_tokenizer": spec, "built": image_tok}
        raise ConfigError("model.model sizes (text_vocab, text_pad_id, image_vocab, image_grid) are not set and "
                          "nothing to read them from: train on code shards (data=codes) or set "
                          "model.image_tokenizer, model.text_tokenizer and model.image_size")

    # -- data --------------------------------------------------------------------------------
    @property
    def image_tokenizer(self) -> nn.Module | None:
        """The frozen stage-1 model: the one this module's checkpoint carries, else the one ``hparams.image_tokenizer``
        names (a path or a spec, see :func:`t2i.pretrained.load_tokenizer`). Built on first use without touching
        the global RNG (a resumed run draws the same numbers); saved in checkpoints under
        ``t2i_image_tokenizer`` (weights + constructor arguments), not with this module's weights."""
        if self._image_tokenizer is None and (self._image_tokenizer_record or self.hparams.image_tokenizer):
            self._image_tokenizer = [self._load_image_tokenizer(self._image_tokenizer_record
                                                                or self.hparams.image_tokenizer)]
        return self._image_tokenizer[0].to(self.device) if self._image_tokenizer else None

    @staticmethod
    def _load_image_tokenizer(source, check_hash: bool = True) -> nn.Module:
        """Frozen, in eval mode, built without drawing from the global RNG (module init would)."""
        from t2i.pretrained.image_tokenizers import load_tokenizer

        with torch.random.fork_rng(devices=[]):
            tok = load_tokenizer(source, key="model.image_tokenizer", check_hash=check_hash)
        return tok.requires_grad_(False).eval()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """The image tokenizer travels with the checkpoint: ``load_tokenizer(<this .ckpt>)`` rebuilds it."""
        from t2i.keys import IMAGE_TOKENIZER_KEY
        from t2i.models.records import tokenizer_record

        if self._image_tokenizer_record is None and self.image_tokenizer is not None:
            self._image_tokenizer_record = tokenizer_record(self._image_tokenizer[0])  # frozen: made once
        if self._image_tokenizer_record is not None:
            checkpoint[IMAGE_TOKENIZER_KEY] = self._image_tokenizer_record
        if self.lexicon is not None:
            checkpoint[LEXICON_KEY] = self.lexicon.to_str()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        from t2i.keys import IMAGE_TOKENIZER_KEY

        if checkpoint.get(LEXICON_KEY):
            from t2i.knowledge.lexicon import EntityLexicon

            self.lexicon = EntityLexicon.from_str(checkpoint[LEXICON_KEY])
        record = checkpoint.get(IMAGE_TOKENIZER_KEY)
        if record is not None:
            self._image_tokenizer_record, self._image_tokenizer = record, None

    def _codes(self, batch: dict) -> torch.Tensor:
        if "codes" in batch:
            return batch["codes"]
        if self.image_tokenizer is None:
            raise ConfigError("the batches carry images, not codes: set model.image_tokenizer=<tokenizer .ckpt> "
                              "to encode them on the fly, or train on t2i-tokenize output (data=codes)")
        with torch.no_grad():
            return self.image_tokenizer.encode(batch["image"])

    def _drop_captions(self, text: torch.Tensor, entities=None):
        """``(text, entities)`` with each caption replaced by the null caption (no entities) with probability
        ``cond_drop_prob`` while training."""
        p = self.hparams.cond_drop_prob
        if not p or not self.training:
            return text, entities
        drop = torch.rand(text.shape[0], device=text.device) < p
        text = torch.where(drop[:, None], torch.full_like(text, self.model.text_pad_id), text)
        if entities is not None:
            entities = (entities[0].masked_fill(drop[:, None], -1), entities[1])
        return text, entities

    # -- training ----------------------------------------------------------------------------
    def _losses(self, batch: dict, model: Transformer | None = None) -> dict[str, torch.Tensor]:
        model = model or self.model
        codes = self._codes(batch)
        wt, wi = self.hparams.text_loss_weight, self.hparams.image_loss_weight
        wc = self.hparams.get("caption_loss_weight") or 0.0
        out = {}
        if wt + wi > 0:
            text, entities = self._drop_captions(batch["text"], self.entities(batch))
            text_loss, image_loss = model.loss(text, codes, entities)
            out = {"loss": (wt * text_loss + wi * image_loss) / (wt + wi), "text_loss": text_loss,
                   "image_loss": image_loss, "image_bits_per_token": image_loss / math.log(2)}
        if wc > 0:
            out["caption_loss"] = model.caption_loss(batch["text"], codes)
            out["loss"] = out.get("loss", 0.0) + wc * out["caption_loss"]
        if not out:
            raise ConfigError("text_loss_weight, image_loss_weight and caption_loss_weight are all 0: nothing to train")
        return out

    def training_step(self, batch, batch_idx):
        """The weighted loss, never None (under DDP every rank must run the backward pass). Each rank's mean
        is weighed by its share of the global batch (:func:`t2i.distributed.batch_share`), so ranks with
        different numbers of samples (undecodable ones dropped) take the global batch's step. A rank
        whose batch is empty runs a stand-in row with weight 0; when every rank's is, the weight is NaN
        and the step is skipped everywhere, like a NaN/inf loss (:class:`StepGuard`)."""
        n = batch["text"].shape[0]
        share = batch_share(n, batch["text"].device)
        if n == 0:
            batch = {k: v.new_zeros((1, *v.shape[1:])) for k, v in batch.items() if torch.is_tensor(v)}
        losses = self._losses(batch)
        loss = losses["loss"] * share
        self.log_dict({f"train/{k}": v for k, v in losses.items() if k != "loss"})
        self.log("train/loss", losses["loss"] if n else loss, prog_bar=live_loss(self))
        return loss

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        """The EMA follows each optimizer step (once per step under gradient accumulation, so the decay
        stays ``ema_decay``), here rather than in ``on_train_batch_end``: checkpoint callbacks run before
        that hook, and the checkpoint must hold the EMA of the weights it holds."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self.ema is not None:
            ema_update(self.ema, self.model, self.hparams.ema_decay, self.guard.ok)

    def configure_optimizers(self):
        return adamw_warmup_cosine(self, self.model, no_decay)

    # -- evaluation --------------------------------------------------------------------------
    def _eval_step(self, batch, split: str):
        if batch["text"].shape[0] == 0:
            return
        losses = self._losses(batch, self.ema)
        self.log_dict({f"{split}/{k}": v for k, v in losses.items()}, prog_bar=split == "val", sync_dist=True,
                      batch_size=batch["text"].shape[0])

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def sampling_model(self) -> Transformer:
        return self.ema if self.ema is not None else self.model

    @torch.no_grad()
    def log_images(self, batch) -> dict[str, torch.Tensor]:
        """One picture: a row per caption of the batch (the validation batch the image logger keeps)
        with the caption on the left, the decoded sample, and the decoded ground-truth codes beside it."""
        from t2i.sampling import decode_codes, generate
        from t2i.viz import captioned_rows

        if self.image_tokenizer is None:
            return {}
        s = dict(self.hparams.sample or {})
        n = min(int(s.pop("num_captions", 8)), batch["text"].shape[0])
        gen = torch.Generator(device=self.device).manual_seed(int(s.pop("seed", 0)))
        entities = self.entities(batch)
        entities = tuple(t[:n] for t in entities) if entities is not None else None
        codes = generate(self.sampling_model(), batch["text"][:n], generator=gen, entities=entities, **s)
        images = [decode_codes(self.image_tokenizer, codes)]
        if "codes" in batch:
            images.append(decode_codes(self.image_tokenizer, batch["codes"][:n]))
        rows = torch.stack(images, 1).flatten(0, 1)  # sample, reference, sample, reference, ...
        captions = [str(c) for c in batch.get("caption", [""] * n)[:n]]
        return {"samples": captioned_rows(rows, captions, per_row=len(images))}
