"""Reranking throughput: caption-likelihood scoring (the transformer's forward on the codes) against CLIP
scoring (our t2i CLIP), with and without decoding the codes to pixels first (the VQGAN decode is what CLIP
really pays: caption scoring reads the codes the sampler produced). Same machine, same run, random weights.

    python experiments/bidirectional/bench_rerank.py                      # CPU, 1 thread, both sizes
    python experiments/bidirectional/bench_rerank.py --threads 2 --json out.json
    python experiments/bidirectional/bench_rerank.py --device cuda --autocast bf16 --batch 256

Sizes (``--sizes shapes,large``):

* ``shapes``: the transformer of conf/experiment/shapes_transformer.yaml (4 layers, 4 heads, d 256, full
  attention, attn_impl math, text_len 18, 8x8 codes of 128), the VQGAN of shapes_vqgan.yaml (ch 32,
  ch_mult [1, 1, 2], 1 res block, no attention, z 32, 128 codes: 8x8 -> 32 px) and the CLIP of
  shapes_clip.yaml (ViT 3 x 128, patch 4, text 3 x 128, embed 128) at 32 px.
* ``large``: a 12-layer, 8-head, d 512 transformer on 16x16 codes of 1024, text_len 32; the same VQGAN
  and CLIP architectures at the 64 px those codes decode to (the VQGAN with 1024 codes).

Caption scoring = ``Transformer.caption_logprob(codes, text)`` and nothing else (the prompt ids are those
the sampler already used). CLIP scoring = ``t2i.pipeline.rerank.score(reranker, images, texts)`` as t2i-generate /
t2i-eval call it (prompt tokenisation and the text tower per candidate included); "+ decode" adds
``VQGAN.decode(codes)``. Each timing is the median of ``--repeats`` passes over ``--batch`` candidates
after one warm-up pass, the four measurements interleaved round by round.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from contextlib import nullcontext

import torch

from t2i.data.shapes import make_split
from t2i.data.tokenizer import TextTokenizer
from t2i.models.clip import CLIP
from t2i.models.transformer import Transformer
from t2i.models.vqgan import VQGAN
from t2i.pipeline.rerank import Reranker, score

SIZES = {
    "shapes": {"transformer": dict(n_layer=4, n_head=4, d_model=256, attention="full", conv_kernel=5,
                                   attn_impl="math"),
               "grid": 8, "image_vocab": 128, "text_len": 18},
    "large": {"transformer": dict(n_layer=12, n_head=8, d_model=512, attention="full", attn_impl="math"),
              "grid": 16, "image_vocab": 1024, "text_len": 32},
}
VQGAN_SHAPES = dict(ch=32, ch_mult=[1, 1, 2], num_res_blocks=1, attn_resolutions=[], z_channels=32, embed_dim=32)
CLIP_SHAPES = dict(embed_dim=128, patch_size=4, vision_width=128, vision_layers=3, vision_heads=4, text_width=128,
                   text_layers=3, text_heads=4, attn_impl="math")


def timed(fns: dict, repeats: int, device: torch.device) -> dict:
    """Median seconds of each ``fns[name]()`` over ``repeats`` rounds after one warm-up round; each round
    runs every function once, in turn, so a change in the machine's load touches all of them alike."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = {name: [] for name in fns}
    for r in range(repeats + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            if r:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


@torch.no_grad()
def bench(size: str, batch: int, repeats: int, device: torch.device, autocast: torch.dtype | None,
          tok: TextTokenizer, captions: list[str], sample: bool = False) -> dict:
    s = SIZES[size]
    g, text_len = s["grid"], s["text_len"]
    torch.manual_seed(0)
    model = Transformer(text_vocab=tok.vocab_size, text_len=text_len, text_pad_id=tok.pad_id,
                        image_vocab=s["image_vocab"], image_grid=(g, g), dropout=0.0, captioning=True,
                        **s["transformer"]).to(device).eval()
    side = g * 4  # the shapes_vqgan architecture is f4
    vqgan = VQGAN(**VQGAN_SHAPES, n_embed=s["image_vocab"], resolution=side).to(device).eval()
    clip = Reranker(CLIP(vocab_size=tok.vocab_size, text_len=text_len, pad_id=tok.pad_id, image_size=side,
                         **CLIP_SHAPES), tok).to(device)
    texts = [captions[i % len(captions)] for i in range(batch)]
    ids = tok.encode(texts, text_len).to(device)
    codes = torch.randint(0, s["image_vocab"], (batch, g, g), generator=torch.Generator().manual_seed(1)).to(device)
    amp = torch.autocast(device.type, dtype=autocast) if autocast is not None else nullcontext()

    def caption():
        with amp:
            model.caption_logprob(codes, ids)

    def decode():
        with amp:
            return vqgan.decode(codes).float()

    images = decode()

    def clip_only():
        with amp:
            score(clip, images, texts, batch_size=batch)

    def clip_decode():
        with amp:
            score(clip, vqgan.decode(codes).float(), texts, batch_size=batch)

    out = {"size": size, "batch": batch, "image_px": side, "grid": g, "text_len": text_len,
           "params_transformer": sum(p.numel() for p in model.parameters()),
           "params_clip": sum(p.numel() for p in clip.parameters()),
           "params_vqgan_decoder": sum(p.numel() for n, p in vqgan.named_parameters()
                                       if n.startswith(("decoder", "post_quant", "quantize")))}
    fns = {"caption": caption, "clip": clip_only, "decode": decode, "clip_decode": clip_decode}
    if sample:  # for scale: drawing the candidates in the first place (KV cache, no top-k, no CFG)
        from t2i.sampling import generate

        def draw():
            with amp:
                generate(model, ids[::8], 8, generator=torch.Generator(device).manual_seed(0), progress=False)

        fns["sample"] = draw
    seconds = timed(fns, repeats, device)
    for name, sec in seconds.items():
        out[f"{name}_per_s"] = batch / sec
    out["caption_vs_clip_decode"] = out["caption_per_s"] / out["clip_decode_per_s"]
    out["caption_vs_clip"] = out["caption_per_s"] / out["clip_per_s"]
    if sample:
        out["caption_vs_sample"] = out["caption_per_s"] / out["sample_per_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="shapes,large")
    ap.add_argument("--batch", type=int, default=64, help="candidates per pass (e.g. 8 prompts x 8 candidates)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--autocast", default=None, choices=[None, "bf16", "fp16"])
    ap.add_argument("--sample", action="store_true", help="also time drawing the candidates (8 per prompt)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)
    device = torch.device(a.device)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[a.autocast]
    captions = [x.caption for x in make_split("train", 400, seed=0, image_size=32, lang="zh")]
    tok = TextTokenizer.train(captions, vocab_size=200)
    if a.sample and a.batch % 8:
        ap.error("--sample draws 8 candidates per prompt: --batch must be a multiple of 8")
    rows = [bench(size, a.batch, a.repeats, device, amp, tok, captions, a.sample) for size in a.sizes.split(",")]
    env = {"device": str(device), "cpu": platform.processor() or platform.machine(), "threads": a.threads,
           "torch": torch.__version__, "autocast": a.autocast,
           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    print(f"env: {json.dumps(env)}")
    print("| size | batch | caption likelihood (codes) | CLIP (images given) | VQGAN decode | CLIP + decode | "
          "caption / (CLIP + decode) |" + (" sampling the candidates |" if a.sample else ""))
    print("|---" * (8 if a.sample else 7) + "|")
    for r in rows:
        print(f"| {r['size']} ({r['grid']}x{r['grid']} codes, {r['image_px']} px) | {r['batch']} | "
              f"{r['caption_per_s']:.1f} | {r['clip_per_s']:.1f} | {r['decode_per_s']:.1f} | "
              f"{r['clip_decode_per_s']:.1f} | {r['caption_vs_clip_decode']:.2f}x |"
              + (f" {r['sample_per_s']:.1f} |" if a.sample else ""))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
