"""CLIP training throughput (images/s of forward + backward + AdamW) at the shapes_clip size, batch 128, 32 px.

    python experiments/reranker/clip_speed.py
"""

from __future__ import annotations

import time

import torch

from t2i.losses.clip import ContrastiveLoss
from t2i.models.clip import CLIP


def main(batch: int = 128, steps: int = 10) -> None:
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    model = CLIP(vocab_size=1000, text_len=24, image_size=32, embed_dim=128, patch_size=4, vision_width=128,
                 vision_layers=3, vision_heads=4, text_width=128, text_layers=3, text_heads=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = ContrastiveLoss()
    images, ids = torch.rand(batch, 3, 32, 32) * 2 - 1, torch.randint(1, 1000, (batch, 24))

    def step():
        loss = loss_fn(model.encode_image(images), model.encode_text(ids), model.scale())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    train = batch * steps / (time.perf_counter() - t0)
    model.eval()
    with torch.no_grad():
        model.score(images, ids)
        t0 = time.perf_counter()
        for _ in range(steps):
            model.score(images, ids)
        infer = batch * steps / (time.perf_counter() - t0)
    print(f"| shapes_clip (ViT 3x128, patch 4, 32 px) | {batch} | {train:.0f} | {infer:.0f} |")


if __name__ == "__main__":
    main()
