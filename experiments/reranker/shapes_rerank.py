"""Does CLIP reranking pick better Shapes samples? Oracle all-attribute accuracy of the image chosen
among K samples per caption: the first, a random one, the CLIP-best one, and the best the oracle
itself could pick (the ceiling of reranking).

    python experiments/reranker/shapes_rerank.py <transformer .ckpt> <clip .ckpt> [--split test] [--n 200] [--k 8]

Captions are drawn fresh from the Shapes split (seed 1), sampled with top-k 32 in batches of 25
captions x K, decoded with the transformer's own image tokenizer and scored by the oracle.
"""

from __future__ import annotations

import argparse
import time

import torch

from t2i.data.oracle import score as oracle
from t2i.data.shapes import make_split, parse_caption
from t2i.lit.transformer import TransformerModule
from t2i.pipeline.rerank import load_reranker, score
from t2i.sampling import decode_codes, generate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("transformer")
    ap.add_argument("clip")
    ap.add_argument("--split", default="test")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--k", type=int, default=8)
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    module = TransformerModule.load_from_checkpoint(args.transformer)
    model = module.sampling_model().eval()
    clip = load_reranker(args.clip)
    tok = clip.tokenizer  # the Shapes tokenizer both were trained with
    image_tok = module.image_tokenizer  # carried by the transformer checkpoint
    size = image_tok.downsample * model.grid[0]
    samples = make_split(args.split, args.n, seed=1, image_size=size)
    captions = [s.caption for s in samples]
    specs = [parse_caption(c) for c in captions]
    text = tok.encode(captions, model.text_len)
    n, k = args.n, args.k
    t0 = time.perf_counter()
    codes = torch.cat([generate(model, text[i:i + 25], k, top_k=32, generator=torch.Generator().manual_seed(i))
                       for i in range(0, n, 25)])
    images = decode_codes(image_tok, codes).view(n, k, 3, size, size)
    t_gen = time.perf_counter() - t0
    t0 = time.perf_counter()
    s = score(clip, images.flatten(0, 1), [c for c in captions for _ in range(k)]).view(n, k)
    t_clip = time.perf_counter() - t0
    right = torch.tensor([[oracle(images[i, j:j + 1], [specs[i]])["all"] for j in range(k)] for i in range(n)])
    rows = torch.arange(n)
    random = torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(0))
    print(f"| {args.split} | {n} | {k} | {right[:, 0].mean():.3f} | {right[rows, random].mean():.3f} | "
          f"**{right[rows, s.argmax(1)].mean():.3f}** | {right.max(1).values.mean():.3f} | "
          f"{n * k * codes[0].numel() / t_gen:.0f} | {n * k / t_clip:.0f} |")


if __name__ == "__main__":
    main()
