"""Filter image-caption pairs into new shards, as Conceptual Captions and ruDALL-E did.

Rules, in order (the first that fails names the drop): image ``min_side`` (pixels), aspect ratio at
most ``max_aspect`` (long side / short side, 2:1 by default), caption length in characters within
``[min_caption_len, max_caption_len]`` (per caption: an image keeps the captions that pass), and, with
a CLIP reranker, the image-caption similarity at least ``clip_threshold`` (scored in batches, per
caption). Undecodable rows are skipped and counted by the reader's :class:`SkipLog` like everywhere.

Writes the kept pairs with :class:`t2i.data.shards.ShardWriter` (original bytes, so nothing is
re-encoded), ``filter_report.json`` (counts per rule, kept / read, score quantiles) and, when CLIP
scored, ``scores.png`` (a histogram of the scores with the threshold marked).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from t2i.data.base import Source
from t2i.data.shards import (
    ShardWriter,
    check_not_input,
    check_output,
    clean_stale_staging,
    existing_shards,
    move_into,
    staging_dir,
)
from t2i.data.skips import BadSample, DataError
from t2i.data.transforms import ImageTransform
from t2i.data.wds import INCOMPLETE, incomplete_marker

RULES = ("min_side", "aspect", "caption_length", "clip_score")


def histogram_png(scores: list[float], threshold: float | None, path: Path, bins: int = 40,
                  size=(480, 240)) -> Path:
    """A plain bar histogram of ``scores`` (threshold as a red line), drawn with PIL."""
    w, h = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    lo, hi = min(scores), max(scores)
    if threshold is not None:
        lo, hi = min(lo, threshold), max(hi, threshold)
    span = (hi - lo) or 1.0
    counts = torch.histc(torch.tensor(scores), bins=bins, min=lo, max=lo + span).tolist()
    top = max(counts) or 1
    pad, bw = 20, (w - 40) / bins
    for i, c in enumerate(counts):
        x0 = pad + i * bw
        draw.rectangle([x0, h - pad - (h - 2 * pad) * c / top, x0 + bw - 1, h - pad], fill=(70, 110, 200))
    if threshold is not None:
        x = pad + (threshold - lo) / span * (w - 40)
        draw.line([x, pad, x, h - pad], fill=(220, 30, 30), width=2)
    draw.text((pad, 2), f"CLIP score: {len(scores)} pairs, range {lo:.3f} .. {lo + span:.3f}", fill="black")
    img.save(path)
    return path


def filter_pairs(source: Source, output, min_side: int = 0, max_aspect: float | None = 2.0,
                 min_caption_len: int = 1, max_caption_len: int | None = None, clip=None,
                 clip_threshold: float | None = None, clip_image_size: int = 224, batch_size: int = 64,
                 shard_size: int = 1000, prefix: str = "shard", overwrite: bool = False) -> dict:
    """Filter ``source`` into shards in ``output``; returns the report (also written as JSON)."""
    check_not_input(source, output, prefix)
    old = existing_shards(output, prefix)
    if old and not overwrite:
        raise DataError(f"output={output} already holds {len(old)} shard(s) named {prefix}-*.tar; choose another "
                        "output or pass overwrite=true")
    if clip_threshold is not None and clip is None:
        raise DataError("clip_threshold is set but no CLIP reranker is given (clip.ckpt=...)")
    out = check_output(output)
    clean_stale_staging(out)
    if incomplete_marker(out).is_file() and not overwrite:
        raise DataError(f"output={output} holds an incomplete set of shards (a killed run; {INCOMPLETE} marks it): "
                        "pass overwrite=true to replace them")
    stage = staging_dir(out)  # written there, moved in whole at the end (as t2i-data convert does)
    shutil.rmtree(stage, ignore_errors=True)
    log = source.log
    log.reset()
    dropped = {r: 0 for r in RULES}
    captions_dropped = {"caption_length": 0, "clip_score": 0}
    scores: list[float] = []
    to_tensor = ImageTransform(clip_image_size)
    n_read = 0
    pending: list = []

    def flush(writer: ShardWriter) -> None:
        if clip is not None and pending:
            images = torch.stack([p[4] for p in pending for _ in p[1]])
            texts = [c for p in pending for c in p[1]]
            s = [v for i in range(0, len(images), batch_size)  # any model with .score(images, texts) -> [N]
                 for v in clip.score(images[i:i + batch_size], texts[i:i + batch_size]).float().cpu().tolist()]
            scores.extend(s)
            i = 0
            for rec, caps, data, image, _ in pending:
                mine, i = s[i:i + len(caps)], i + len(caps)
                kept = [c for c, v in zip(caps, mine) if clip_threshold is None or v >= clip_threshold]
                captions_dropped["clip_score"] += len(caps) - len(kept)
                if kept:
                    writer.write(rec.key, image, kept, rec.where, data)
                else:
                    dropped["clip_score"] += 1
        pending.clear()

    try:
        with ShardWriter(stage, prefix, shard_size) as writer:
            for rec in source.records(log):
                n_read += 1
                try:
                    data, image = source.load_sample(rec)
                except BadSample as e:
                    log.skip(e.reason, e.where)
                    continue
                log.ok()
                w, h = image.size
                if min(w, h) < min_side:
                    dropped["min_side"] += 1
                    continue
                if max_aspect is not None and max(w, h) / max(1, min(w, h)) > max_aspect:
                    dropped["aspect"] += 1
                    continue
                caps = [c for c in rec.captions
                        if len(c) >= min_caption_len and (max_caption_len is None or len(c) <= max_caption_len)]
                captions_dropped["caption_length"] += len(rec.captions) - len(caps)
                if not caps:
                    dropped["caption_length"] += 1
                    continue
                if clip is None:
                    writer.write(rec.key, image, caps, rec.where, data)
                    continue
                pending.append((rec, caps, data, image, to_tensor(image)))
                if sum(len(p[1]) for p in pending) >= batch_size:
                    flush(writer)
            flush(writer)
            kept = writer.count
        shards = move_into(stage, writer.shards, out, prefix)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    report = {"read": n_read, "kept": kept, "skipped_bad": dict(log.by_reason), "dropped_images": dropped,
              "dropped_captions": captions_dropped,
              "rules": {"min_side": min_side, "max_aspect": max_aspect, "min_caption_len": min_caption_len,
                        "max_caption_len": max_caption_len, "clip_threshold": clip_threshold},
              "shards": [str(p) for p in shards]}
    if scores:
        q = torch.tensor(scores).quantile(torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])).tolist()
        report["clip_scores"] = {"n": len(scores), "quantiles": dict(zip(("5%", "25%", "50%", "75%", "95%"), q))}
        tmp = histogram_png(scores, clip_threshold, out / f".scores.png.{os.getpid()}.png")
        os.replace(tmp, out / "scores.png")
        report["histogram"] = str(out / "scores.png")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".filter_report.json.{os.getpid()}"  # whole or absent: written aside, then renamed
    tmp.write_text(json.dumps(report, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, out / "filter_report.json")
    return report
