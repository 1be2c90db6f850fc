"""Layout fidelity on real label maps: mIoU of a user-supplied segmentation network (issue 21, SPADE).

The network is built from a config (``seg.model``: ``{_target_: torchvision.models.segmentation.deeplabv3_resnet50,
num_classes: 151, weights: null, weights_backbone: null}`` or any module taking ``[B, 3, H, W]`` images and
returning logits ``[B, C, h, w]`` or a dict with ``out``) and its weights read from a local file (``seg.ckpt``);
nothing is downloaded. A TorchScript file works without ``seg.model``.

mIoU follows the usual definition: a confusion matrix over all pixels whose ground truth is not ``ignore_index``;
per class ``IoU = TP / (TP + FP + FN)``; the mean over classes that occur in the ground truth or the prediction
(union > 0), ``ignore_index`` excluded. ``pixel_accuracy`` = TP summed / counted pixels.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from t2i.errors import ConfigError, T2IError, reason

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfusionMatrix:
    """Accumulates ``[C, C]`` counts (rows: ground truth, columns: prediction)."""

    def __init__(self, num_classes: int, ignore_index: int | None = None):
        self.num_classes, self.ignore_index = int(num_classes), ignore_index
        self.matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        pred, target = pred.reshape(-1).long().cpu(), target.reshape(-1).long().cpu()
        keep = (target >= 0) & (target < self.num_classes)
        if self.ignore_index is not None:
            keep &= target != self.ignore_index
        pred, target = pred[keep].clamp(0, self.num_classes - 1), target[keep]
        self.matrix += torch.bincount(target * self.num_classes + pred,
                                      minlength=self.num_classes ** 2).view(self.num_classes, self.num_classes)

    def compute(self) -> dict:
        m = self.matrix.double()
        tp = m.diag()
        union = m.sum(0) + m.sum(1) - tp
        valid = union > 0
        if self.ignore_index is not None and 0 <= self.ignore_index < self.num_classes:
            valid[self.ignore_index] = False
        iou = torch.where(valid, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
        total = m.sum()
        return {"miou": float(iou[valid].mean()) if valid.any() else float("nan"),
                "pixel_accuracy": float(tp.sum() / total) if total > 0 else float("nan"),
                "classes": int(valid.sum()), "pixels": int(total),
                "per_class_iou": [None if v != v else round(float(v), 6) for v in iou.tolist()]}


def mean_iou(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None = None) -> dict:
    """:class:`ConfusionMatrix` over one batch of predictions and ground truths."""
    cm = ConfusionMatrix(num_classes, ignore_index)
    cm.update(pred, target)
    return cm.compute()


def _state_dict(blob) -> dict:
    if isinstance(blob, dict):
        for k in ("state_dict", "model", "model_state", "net"):
            if isinstance(blob.get(k), dict):
                blob = blob[k]
                break
    if not isinstance(blob, dict):
        raise T2IError("seg.ckpt holds no state dict")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in blob.items()}


def load_segmenter(seg, device="cpu") -> nn.Module:
    """The segmentation network ``seg`` (a config with ``ckpt``, ``model``) describes, in eval mode."""
    seg = dict(seg or {})
    path = seg.get("ckpt")
    if not path:
        raise ConfigError("layout fidelity on a real dataset needs a segmentation network: eval.seg.ckpt=<local "
                          "weights file> and eval.seg.model={_target_: torchvision.models.segmentation."
                          "deeplabv3_resnet50, num_classes: ..., weights: null, weights_backbone: null} (nothing is "
                          "downloaded; eval.seg.enabled=false skips mIoU)")
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise ConfigError(f"eval.seg.ckpt={path}: no such file (put the segmentation network's weights there; "
                          "they are never downloaded)")
    spec = seg.get("model")
    if not spec:
        try:
            return torch.jit.load(str(p), map_location=device).eval()
        except Exception as e:
            raise ConfigError(f"eval.seg.model is not set and eval.seg.ckpt={path} is not a TorchScript file "
                              f"({type(e).__name__}); give eval.seg.model={{_target_: ...}}") from None
    from hydra.utils import instantiate

    spec = dict(spec)
    model = instantiate(spec)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"eval.seg.model={spec.get('_target_')} did not build an nn.Module")
    try:
        blob = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise T2IError(f"eval.seg.ckpt={path} cannot be read ({reason(e)})") from None
    missing, unexpected = model.load_state_dict(_state_dict(blob), strict=False)
    missing = [k for k in missing if not k.startswith("aux_classifier.")]  # torchvision's optional aux head
    if missing or unexpected:
        raise T2IError(f"eval.seg.ckpt={path} does not fit eval.seg.model ({spec.get('_target_')}): "
                       f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device).eval()


@torch.no_grad()
def segment(model: nn.Module, images: torch.Tensor, size: tuple[int, int], mean=IMAGENET_MEAN, std=IMAGENET_STD,
            input_size: int | None = None, pred_offset: int = 0) -> torch.Tensor:
    """Class ids ``[B, *size]`` for images ``[B, 3, H, W]`` in [-1, 1]: normalised with ``mean`` / ``std``,
    optionally resized (bilinear) to ``input_size``, logits resized back to ``size``; ``pred_offset`` added (a
    network trained without the unlabeled class: ADE20K's 150 -> our 1..150)."""
    x = (images.float() + 1) / 2
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    x = (x - m) / s
    if input_size:
        x = nn.functional.interpolate(x, size=(int(input_size), int(input_size)), mode="bilinear", align_corners=False)
    out = model(x)
    if isinstance(out, dict):
        out = out["out"]
    out = nn.functional.interpolate(out.float(), size=tuple(size), mode="bilinear", align_corners=False)
    return out.argmax(1) + int(pred_offset)
