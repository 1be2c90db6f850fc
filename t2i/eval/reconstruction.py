"""``t2i-eval eval=reconstruction``: an image tokenizer's rFID, PSNR, SSIM, LPIPS, codebook use and (on Shapes) the
oracle's accuracy on the reconstructions, on a split,
shared across processes (rank 0 writes ``reconstructions.png``)."""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torchvision.utils import save_image
from tqdm.auto import tqdm

from t2i.errors import ConfigError, T2IError
from t2i.eval.items import shapes_items, source_items
from t2i.eval.processes import autocast_dtype, gathered, rank_world, sha256

ORACLE_KEYS = ("color", "shape", "position", "size", "all")


def reconstruction(cfg: DictConfig, device) -> dict:
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    from t2i.data.oracle import score as oracle
    from t2i.eval.generation import build_scores
    from t2i.losses.perceptual import LPIPS
    from t2i.metrics.scores import to_uint8
    from t2i.pretrained.image_tokenizers import load_tokenizer

    p = cfg.eval
    if not cfg.tokenizer_ckpt:
        raise ConfigError("eval=reconstruction needs tokenizer_ckpt=<a t2i-train experiment=*_vqgan / *_dvae .ckpt>")
    tok = load_tokenizer(cfg.tokenizer_ckpt, key="tokenizer_ckpt").to(device).eval()  # also a transformer .ckpt
    size = int(p.image_size)
    items = (shapes_items(str(p.shapes_split), int(p.num_captions), int(p.caption_seed), size, "zh")
             if p.source == "shapes" else source_items(p, size))
    metrics_cfg = OmegaConf.merge(cfg.metrics, {"inception_score": False, "clip_score": False, "fd_clip": False})
    scores = build_scores(metrics_cfg, None, device, seed=int(cfg.seed))
    lpips = LPIPS(cfg.metrics.get("vgg_path")).to(device) if cfg.metrics.get("lpips", True) else None
    rank, world = rank_world()
    amp = autocast_dtype(cfg, device)  # the FID extractor only: the tokenizer and LPIPS run in float32
    amp = torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # psnr, ssim, lpips sums; images
    counts = torch.zeros(tok.codebook_size, dtype=torch.long, device=device)
    read = torch.zeros(6, dtype=torch.long, device=device)  # the oracle's hits on reconstructions (Shapes)
    shown, t0 = [], time.perf_counter()
    bs = int(cfg.batch_size)
    batches = [a for k, a in enumerate(range(0, len(items.captions), bs)) if k % world == rank]
    for a in tqdm(batches, desc="reconstruction", disable=not cfg.progress or rank != 0):
        real = items.real(a, a + bs)
        if not len(real):
            continue
        x = real.to(device).float() / 127.5 - 1
        with torch.no_grad():
            codes = tok.encode(x)
            y = to_uint8(tok.decode(codes)).float() / 127.5 - 1  # scored as a saved PNG would be
            counts += torch.bincount(codes.flatten(), minlength=tok.codebook_size)
            x01, y01 = (x + 1) / 2, (y + 1) / 2
            totals[0] += peak_signal_noise_ratio(y01, x01, data_range=1.0, reduction="none", dim=(1, 2, 3)).sum()
            totals[1] += structural_similarity_index_measure(y01, x01, data_range=1.0, reduction="none").sum()
            if lpips is not None:
                totals[2] += lpips(y, x).sum()
            totals[3] += len(x)
            if items.specs is not None:  # can the Shapes oracle still read each reconstruction right?
                hits = oracle(y.cpu(), items.specs[a:a + len(x)])
                read += torch.tensor([round(hits[k] * hits["n"]) for k in ORACLE_KEYS] + [hits["n"]], device=device)
            if scores.frechet:
                with amp:
                    scores.update_real(x)
                    scores.update_fake(y)
        if a < 8:  # the first 8 (original, reconstruction) pairs, whichever rank holds them
            pairs = torch.stack([x[: 8 - a], y[: 8 - a]], 1).cpu()
            shown += [(a + i, pair) for i, pair in enumerate(pairs)]
    if world > 1:
        dist.all_reduce(totals)
        dist.all_reduce(counts)
        dist.all_reduce(read)
        shown = [s for part in gathered(shown) for s in part]
    n = int(totals[3])
    if n == 0:
        raise T2IError(f"eval=reconstruction: no readable images in {p.get('split')}")
    probs = counts.double() / counts.sum()
    metrics = {"psnr": float(totals[0]) / n, "ssim": float(totals[1]) / n,
               "codebook_perplexity": float(torch.exp(-(probs[probs > 0] * probs[probs > 0].log()).sum())),
               "codebook_used": int((counts > 0).sum()), "codebook_size": tok.codebook_size}
    if lpips is not None:
        metrics["lpips"] = float(totals[2]) / n
    if int(read[-1]):
        metrics["oracle_acc"] = {k: int(v) / int(read[-1]) for k, v in zip(ORACLE_KEYS, read.tolist())}
    if scores.frechet and n >= 2:
        metrics["rfid"] = scores.compute()["fid"]
    metrics.update(n=n, seconds=time.perf_counter() - t0, real_skipped=sum(gathered(items.skipped.get("count", 0))),
                   extractors=scores.describe())
    if rank == 0:
        pics = torch.cat([pair for _, pair in sorted(shown, key=lambda s: s[0])])
        from t2i.viz import sample_grid  # small images upscaled (nearest) to readable cells, framed

        save_image(sample_grid(pics, nrow=min(8, len(pics)), value_range=(-1.0, 1.0)),
                   Path(cfg.output) / "reconstructions.png")
    return {"splits": {str(p.get("shapes_split", "val")): metrics},
            "summary": {k: metrics[k] for k in ("rfid", "psnr", "ssim", "lpips") if k in metrics}
            | ({"oracle_all": metrics["oracle_acc"]["all"]} if "oracle_acc" in metrics else {}),
            "checkpoints": {"tokenizer": str(cfg.tokenizer_ckpt), "tokenizer_sha256": sha256(cfg.tokenizer_ckpt)},
            "protocol": {"image_size": size, "processes": world}}
