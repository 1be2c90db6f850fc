"""Data-loading benchmark: ImageTextDataModule on an EasyNLP TSV of 256px JPEGs vs plain PIL.

Both sides run in the same process on the same images:
  * baseline: PIL decode (from in-memory JPEG bytes) + resize to 256x256, in 1 process and in a
    pool of ``--workers`` processes (the same parallelism the data module gets);
  * ours: ImageTextDataModule(source=easynlp_tsv, num_workers=--workers) reading the TSV from disk:
    line read, base64, decode, resize + crop, [-1, 1] tensor, caption tokenization, collation.
The ratio ours / baseline (seconds per sample, best of repeated passes on each side) is the overhead;
target <= 1.5x.

    python experiments/data_loading/bench.py --out experiments/data_loading/RESULTS.md
"""

from __future__ import annotations

import argparse
import base64
import io
import multiprocessing as mp
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_images(n: int, short: int = 256, seed: int = 0) -> list[bytes]:
    """Photo-like JPEGs: smooth colour fields + texture, ``short`` px on the short side, mixed aspect ratios."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = [(short, short), (short * 4 // 3, short), (short, short * 5 // 4)][i % 3]
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([np.sin(xx / rng.uniform(8, 40) + rng.uniform(0, 6)) for _ in range(3)], -1)
        base += np.stack([np.cos(yy / rng.uniform(8, 40)) for _ in range(3)], -1)
        img = (base * 60 + 128 + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def pil_decode_resize(data: bytes, size: int = 256) -> tuple[int, int]:
    img = Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), Image.BICUBIC)
    return img.size


def time_baseline(images: list[bytes], workers: int) -> float:
    t = time.perf_counter()
    if workers <= 1:
        for b in images:
            pil_decode_resize(b)
    else:
        with mp.get_context("fork").Pool(workers) as pool:
            pool.map(pil_decode_resize, images, chunksize=32)
    return time.perf_counter() - t


def time_datamodule(tsv: Path, tokenizer: Path, workers: int, batch_size: int, epochs: int) -> float:
    """Seconds per sample, best epoch of ``epochs`` (after a warm-up epoch), like the baseline's best of 2."""
    from t2i.data.datamodule import ImageTextDataModule

    dm = ImageTextDataModule(source="easynlp_tsv", train=str(tsv), tokenizer=str(tokenizer), image_size=256,
                             text_len=32, batch_size=batch_size, num_workers=workers, persistent_workers=True)
    dm.setup("fit")
    loader = dm.train_dataloader()
    for _ in loader:  # warm-up epoch: starts the persistent workers
        pass
    best = float("inf")
    for _ in range(epochs):
        n, t = 0, time.perf_counter()
        for batch in loader:
            batch = dm.on_after_batch_transfer(batch, 0)  # what the Trainer does: uint8 -> [-1, 1] float
            assert batch["image"].dtype == torch.float32
            n += batch["image"].shape[0]
        best = min(best, (time.perf_counter() - t) / n)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1536)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--source-size", type=int, nargs="+", default=[256, 512],
                    help="short side of the source JPEGs; one table row group per size")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)

    results = [run_size(args, short) for short in args.source_size]
    w = args.workers
    lines = [
        "# Data loading: ImageTextDataModule vs plain PIL",
        "",
        f"EasyNLP TSV of {args.n} JPEGs (mixed aspect 1:1, 4:3, 4:5), output 256x256, batch {args.batch_size}, "
        f"text_len 32. Machine: {os.cpu_count()} CPU cores, {platform.machine()}, torch {torch.__version__}.",
        "Baseline: PIL decode from in-memory bytes + resize to 256x256. Ours: the whole loader from the TSV on disk",
        "(line read, base64, decode, resize + crop, tensor, caption tokenization, collation, [-1, 1] floats).",
        "",
        f"| source short side | PIL 1 proc (ms/sample) | PIL {w} procs (ms/sample) | datamodule, {w} workers "
        f"(ms/sample) | samples/s | overhead vs PIL {w} procs |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for short, (p1, pw, ours) in zip(args.source_size, results):
        lines.append(f"| {short} px | {1000 * p1:.2f} | {1000 * pw:.2f} | {1000 * ours:.2f} | {1 / ours:.0f} | "
                     f"**{ours / pw:.2f}x** |")
    lines += [
        "",
        "Target: overhead <= 1.5x against plain PIL with the same number of processes.",
        "",
        "Command: `make bench` (= `python experiments/data_loading/bench.py --out experiments/data_loading/RESULTS.md`)",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


def run_size(args, short: int) -> tuple[float, float, float]:
    """Seconds per sample: PIL in 1 process, PIL in ``workers`` processes, the data module."""
    from t2i.data.tokenizer import TextTokenizer

    images = make_images(args.n, short)
    captions = [f"第{i}张图片 一个红色的圆形 picture {i}" for i in range(args.n)]
    with tempfile.TemporaryDirectory() as tmp:
        tsv = Path(tmp) / "bench.tsv"
        with open(tsv, "w", encoding="utf-8") as f:
            for i, (b, c) in enumerate(zip(images, captions)):
                f.write(f"{i}\t{c}\t{base64.b64encode(b).decode()}\n")
        tok_path = Path(tmp) / "tokenizer.json"
        TextTokenizer.train(captions, vocab_size=500).save(tok_path)
        base1 = min(time_baseline(images, 1) for _ in range(2))
        basew = min(time_baseline(images, args.workers) for _ in range(2))
        ours = time_datamodule(tsv, tok_path, args.workers, args.batch_size, args.epochs)
    return base1 / args.n, basew / args.n, ours


if __name__ == "__main__":
    main()
