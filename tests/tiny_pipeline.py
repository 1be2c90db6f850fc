"""Tiny checkpoints made in the test session, for the Python API and the commands that stand on it: a
transformer over an 8-colour block tokenizer (with a captioning direction), a random CLIP, each a file."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

SIDE, BLOCK, TEXT_LEN = 3, 8, 18
COLORS = [(255, 255, 255), (220, 40, 40), (40, 160, 60), (40, 80, 220), (240, 200, 40), (150, 60, 200),
          (250, 140, 30), (0, 0, 0)]


class BlockTokenizer(nn.Module):
    """Code c <-> an 8x8 block of colour c (encode: the nearest colour of each block's mean)."""

    def __init__(self, block: int = BLOCK):
        super().__init__()
        self.config = {"block": block}
        self.codebook_size, self.downsample = len(COLORS), block
        self.register_buffer("colors", torch.tensor(COLORS, dtype=torch.float32) / 127.5 - 1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        x = self.colors[codes].permute(0, 3, 1, 2)
        return x.repeat_interleave(self.downsample, 2).repeat_interleave(self.downsample, 3)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        mean = nn.functional.avg_pool2d(images.float(), self.downsample).permute(0, 2, 3, 1)  # [B, h, w, 3]
        return torch.cdist(mean.flatten(1, 2), self.colors[None].expand(len(images), -1, -1)).argmin(-1).view(
            *mean.shape[:3])


def captions(n: int = 24, split: str = "train") -> list[str]:
    from t2i.data.shapes import make_split

    return [s.caption for s in make_split(split, n, seed=3, image_size=24, lang="zh")]


def text_tokenizer():
    from t2i.data.tokenizer import TextTokenizer

    return TextTokenizer.train(captions(200), vocab_size=200)


def config(tok, captioning: bool = True) -> dict:
    return {"text_vocab": tok.vocab_size, "text_len": TEXT_LEN, "text_pad_id": tok.pad_id, "image_vocab": len(COLORS),
            "image_grid": [SIDE, SIDE], "n_layer": 2, "n_head": 2, "d_model": 32, "attention": "full",
            "captioning": captioning}


def tiny_model(tok, captioning: bool = True, seed: int = 0):
    from t2i.models.transformer import Transformer

    torch.manual_seed(seed)
    m = Transformer(**config(tok, captioning))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # spread the logits: candidates differ, scores are not ties
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return m.eval()


def write_checkpoints(tok, out: Path) -> dict[str, Path]:
    """``{"transformer", "plain" (no captioning), "clip"}`` checkpoint files in ``out``."""
    from t2i.models.clip import CLIP
    from t2i.pretrained.export import transformer_checkpoint

    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, cap in (("transformer", True), ("plain", False)):
        ck = transformer_checkpoint(config(tok, cap), tiny_model(tok, cap).state_dict(), tok, BlockTokenizer(), "test")
        torch.save(ck, out / f"{name}.ckpt")
        paths[name] = out / f"{name}.ckpt"
    torch.manual_seed(5)
    hp = dict(vocab_size=tok.vocab_size, text_len=TEXT_LEN, pad_id=tok.pad_id, image_size=SIDE * BLOCK, embed_dim=16,
              patch_size=4, vision_width=16, vision_layers=1, vision_heads=2, text_width=16, text_layers=1,
              text_heads=2)
    clip = CLIP(**hp)
    torch.save({"hyper_parameters": {"_target_": "t2i.lit.clip.CLIPModule", "model": hp},
                "state_dict": {f"model.{k}": v for k, v in clip.state_dict().items()},
                "datamodule": {"tokenizer": tok.to_str()}}, out / "clip.ckpt")
    paths["clip"] = out / "clip.ckpt"
    return paths
