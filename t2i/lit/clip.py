"""CLIPModule: trains :class:`t2i.models.clip.CLIP` on (image, caption) batches of an ImageTextDataModule.

Loss: symmetric InfoNCE with negatives from every rank (:class:`t2i.losses.clip.ContrastiveLoss`).
Validation: retrieval recall R@1/5/10 image->text and text->image over the whole validation split
(an image counts as retrieved by any of its captions' rows; a caption by its own image). The text
vocabulary and pad id come from the datamodule's tokenizer when ``model.vocab_size`` is null (the
model is then built in ``configure_model``, after the data is prepared); they are saved as
hyper-parameters, so a checkpoint rebuilds the model alone.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.distributed as dist

from t2i.errors import ConfigError
from t2i.lit.optim import GuardedSteps, StepGuard, adamw_warmup_cosine, live_loss
from t2i.losses.clip import ContrastiveLoss
from t2i.models.clip import CLIP

RECALL_AT = (1, 5, 10)


def no_decay(name: str, p: torch.nn.Parameter) -> bool:
    """Biases, norms, the temperature, embeddings, position tables and the class token take no decay."""
    return p.ndim < 2 or "pos" in name or "cls" in name or "tok" in name


def retrieval_recall(image: torch.Tensor, text: torch.Tensor, keys: list[str]) -> dict[str, float]:
    """R@k both ways for pair rows (``image[i]``, ``text[i]``, ``keys[i]``); rows sharing a key show the
    same image. Features are unit length."""
    first: dict[str, int] = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    uniq = list(first)
    index = {k: j for j, k in enumerate(uniq)}
    img = image[[first[k] for k in uniq]]
    owner = torch.tensor([index[k] for k in keys])
    sim = text @ img.t()  # [texts, images]
    out = {}
    target = sim[torch.arange(len(keys)), owner]
    t2i_rank = (sim > target[:, None]).sum(1)  # images scoring above the right one
    i2t_sims = sim.t()  # [images, texts]
    own = owner[None, :] == torch.arange(len(uniq))[:, None]
    best_own = i2t_sims.masked_fill(~own, float("-inf")).amax(1)
    i2t_rank = (i2t_sims.masked_fill(own, float("-inf")) > best_own[:, None]).sum(1)
    for k in RECALL_AT:
        out[f"t2i_R@{k}"] = (t2i_rank < k).float().mean().item()
        out[f"i2t_R@{k}"] = (i2t_rank < k).float().mean().item()
    return out


class CLIPModule(GuardedSteps, pl.LightningModule):
    bad_loss = "CLIP loss"

    def __init__(self, model: dict, lr: float = 5e-4, betas=(0.9, 0.98), weight_decay: float = 0.1,
                 warmup_steps: int = 100, schedule: str = "cosine", total_steps: int | None = None,
                 min_lr_ratio: float = 0.0, local_loss: bool = False, max_bad_steps: int = 20):
        super().__init__()
        if schedule not in ("constant", "cosine"):
            raise ConfigError(f"model.schedule={schedule!r} is unknown; use constant or cosine")
        self.save_hyperparameters()
        self.loss = ContrastiveLoss(local_loss)
        self.model: CLIP | None = None
        if model.get("vocab_size") is not None:
            self.model = CLIP(**model)
        self._val: list = []
        self.guard = StepGuard(max_bad_steps)

    def configure_model(self) -> None:
        """Build the model once the datamodule's tokenizer exists (Shapes builds it in prepare_data)."""
        if self.model is not None:
            return
        dm = getattr(self.trainer, "datamodule", None) if self._trainer else None
        tok = getattr(dm, "tokenizer", None)
        if tok is None:
            raise ConfigError("model.model.vocab_size is not set and the data has no text tokenizer to read it "
                              "from; set data.tokenizer or model.model.vocab_size / pad_id")
        self.hparams.model.update(vocab_size=tok.vocab_size, pad_id=tok.pad_id)
        self.model = CLIP(**self.hparams.model)

    # -- training ----------------------------------------------------------------------------
    def _features(self, batch):
        return self.model.encode_image(batch["image"]), self.model.encode_text(batch["text"])

    def _rows(self) -> int | None:
        """Every rank's largest training batch (the loader's batch size): the contrastive loss pads each
        rank's features to it, so ranks may hold different numbers of pairs."""
        loader = self.trainer.train_dataloader if self._trainer is not None else None
        return getattr(loader, "batch_size", None)

    def training_step(self, batch, batch_idx):
        """The contrastive loss over every rank's pairs, never None (under DDP every rank must run the
        backward pass). Ranks may hold different numbers of pairs (undecodable images dropped); a rank
        whose batch is empty runs a stand-in pair that the loss masks out. When no rank has a pair the
        loss is NaN and the step is skipped on every rank (:class:`t2i.lit.optim.StepGuard`), like a
        NaN/inf loss."""
        n = batch["image"].shape[0]
        if n == 0:  # a finite stand-in (text not all pads): NaN features would leak into the gradients
            token = 2 if self.hparams.model.get("pad_id", 0) == 1 else 1
            batch = {k: v.new_full((1, *v.shape[1:]), token) if k == "text" else v.new_zeros((1, *v.shape[1:]))
                     for k, v in batch.items() if torch.is_tensor(v)}
        image, text = self._features(batch)
        loss = self.loss(image, text, self.model.scale(), rows=self._rows(), count=n)
        self.log("train/loss", loss, prog_bar=live_loss(self))
        self.log("train/logit_scale", self.model.scale().detach())
        return loss

    def configure_optimizers(self):
        return adamw_warmup_cosine(self, self.model, no_decay)

    # -- evaluation --------------------------------------------------------------------------
    def _eval_step(self, batch, split: str):
        if batch["image"].shape[0] == 0:
            return
        image, text = self._features(batch)
        self.log(f"{split}/loss", self.loss(image, text, self.model.scale()), sync_dist=True,
                 batch_size=image.shape[0])
        self._val.append((image.float().cpu(), text.float().cpu(), list(batch["key"])))

    def _recall_epoch_end(self, split: str):
        parts, self._val = self._val, []
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, parts)
            parts = [p for rank in gathered for p in rank]
        if not parts:
            return
        image, text = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        keys = [k for p in parts for k in p[2]]
        for name, value in retrieval_recall(image, text, keys).items():
            self.log(f"{split}/{name}", value, prog_bar=name == "t2i_R@1", rank_zero_only=True)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self):
        self._recall_epoch_end("val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def on_test_epoch_end(self):
        self._recall_epoch_end("test")

    @torch.no_grad()
    def log_images(self, batch) -> dict[str, torch.Tensor]:
        """For the first 4 captions of the batch, the batch's 4 best-scoring images, one row per caption
        with the caption written on its left (a caption's own image is not marked; see the grid's key)."""
        from t2i.viz import captioned_rows

        n = min(4, batch["image"].shape[0])
        if n == 0:
            return {}
        image, text = self._features(batch)
        k = min(4, image.shape[0])
        top = (text[:n] @ image.t()).topk(k, dim=1).indices
        captions = [str(c) for c in batch.get("caption", [""] * n)[:n]]
        return {"retrieval": captioned_rows(batch["image"][top.flatten()], captions, per_row=k)}
