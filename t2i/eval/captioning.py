"""``t2i-eval`` captioning protocols (``kind: caption``, issue 20): images -> captions with the checkpoint's
image -> text direction (``model.captioning=true``), scored against the references.

    t2i-eval eval=shapes_caption ckpt=<shapes_bidirectional .ckpt>
    t2i-eval eval=muge_caption ckpt=... eval.split.root=data/muge_ic
    t2i-eval eval=coco_cn_caption ckpt=... eval.caption.beam_size=5

Each image is encoded with the checkpoint's image tokenizer (at the model's resolution: shorter side resized,
centre crop) and captioned in batches with ``eval.caption`` (``method`` greedy | beam | sample, ``beam_size``,
``length_penalty``, ``top_k`` / ``top_p`` / ``temperature``, ``use_cache``; sampling seeded with
``seed + index of the batch's first image``, so the numbers do not depend on the number of processes).
Scores (:mod:`t2i.metrics.captioning`): BLEU-1..4, CIDEr-D and ROUGE-L from pycocoevalcap's scorers on our own
tokenization (``eval.lang``: ``zh`` one token per character, ``en`` lowercase words). ``shapes_caption``
also parses every caption back into attributes (:func:`t2i.data.shapes.parse_caption`) and compares it with
the image's true spec: per attribute, ``all`` four, and ``parsed`` (the caption reads as a Shapes caption at
all); its references are every template caption of the spec in ``eval.lang``. Rows the reader skips are
counted by reason (``rows_skipped``; past ``eval.max_bad_fraction`` the run stops); images that do not decode
are skipped, counted (``skipped``) and named in the log. Output: ``captions.jsonl`` (split, key, caption,
references, per-image CIDEr-D / ROUGE-L; Shapes: the true and the parsed spec) and ``captions.png`` (the
first 8 images of each split with their captions) beside ``metrics.json`` / ``metrics.md``.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torchvision.utils import save_image
from tqdm.auto import tqdm

from t2i.errors import ConfigError, T2IError

log = logging.getLogger("t2i.eval")
ATTRIBUTES = ("color", "shape", "position", "size")


def caption_settings(p: DictConfig, prefix: str = "eval.") -> dict:
    """``<prefix>caption`` checked before any model loads (one ConfigError naming the key)."""
    from t2i.captioning import METHODS
    from t2i.sampling import check_sampling

    c = dict(OmegaConf.to_container(p.get("caption") or {}, resolve=True))
    s = {"method": c.get("method", "beam"), "beam_size": c.get("beam_size", 4),
         "length_penalty": float(c.get("length_penalty", 1.0)), "top_k": c.get("top_k"), "top_p": c.get("top_p"),
         "temperature": float(c.get("temperature", 1.0)), "use_cache": bool(c.get("use_cache", True))}
    if s["method"] not in METHODS:
        raise ConfigError(f"{prefix}caption.method={s['method']!r}: use one of {', '.join(METHODS)}")
    b = s["beam_size"]
    if isinstance(b, bool) or not isinstance(b, int) or b < 1:
        raise ConfigError(f"{prefix}caption.beam_size={b} must be an integer >= 1")
    if s["method"] == "sample":
        check_sampling(1, s["top_k"], s["top_p"], s["temperature"], prefix=f"{prefix}caption.")
    if p.get("lang", "zh") not in ("zh", "en"):
        raise ConfigError(f"{prefix}lang={p.get('lang')!r}: use zh (character tokens) or en (words)")
    return s


class Images:
    """One split: keys, references, true Shapes specs (or None) and, lazily, the uint8 images ``[n, 3, S, S]``
    of a slice with the indices that decoded."""

    def __init__(self, keys, refs, load, specs=None):
        self.keys, self.refs, self._load, self.specs = keys, refs, load, specs
        self.bad = {"count": 0, "examples": []}
        self.rows_skipped: dict[str, int] = {}  # the reader's skips by reason (caption / index rows)

    def load(self, a: int, b: int) -> tuple[torch.Tensor, list[int]]:
        return self._load(a, b, self.bad)


def shapes_images(split: str, n: int, seed: int, size: int, lang: str) -> Images:
    from t2i.data.shapes import make_split
    from t2i.data.transforms import to_raw

    samples = make_split(split, n, seed=seed, image_size=size, lang=lang)
    pixels = torch.stack([to_raw(s.image.convert("RGB")) for s in samples]).permute(0, 3, 1, 2)
    return Images([s.key for s in samples], [list(s.captions) for s in samples],
                  lambda a, b, bad: (pixels[a:b], list(range(a, min(b, len(samples))))),
                  [s.spec for s in samples])


def source_images(p: DictConfig, size: int) -> Images:
    """``num_images`` records (all when null) of ``eval.split`` drawn with ``caption_seed``, every caption of
    each a reference; records the reader skipped are counted by its SkipLog (``max_bad_fraction``)."""
    from t2i.data.formats import open_source
    from t2i.data.skips import BadSample, SkipLog
    from t2i.data.transforms import ImageTransform

    spec = p.split
    src = open_source(p.source, **dict(spec), key="eval.split") if isinstance(spec, DictConfig) else \
        open_source(p.source, str(spec), key="eval.split")
    skips = SkipLog(float(p.get("max_bad_fraction", 0.01)), name=f"eval {p.name}", key="eval.max_bad_fraction")
    records = src.records(skips)
    skips.ok(len(records))
    if skips.n_bad:
        log.warning("eval %s: %s", p.name, skips.summary())
    skips.check()  # past eval.max_bad_fraction the run stops, naming the worst file
    if not records:
        raise T2IError(f"eval.split={OmegaConf.to_container(spec) if isinstance(spec, DictConfig) else spec}: "
                       "no usable images")
    if p.get("num_images") is not None and int(p.num_images) < len(records):
        g = torch.Generator().manual_seed(int(p.caption_seed))
        records = [records[i] for i in sorted(torch.randperm(len(records), generator=g)[:int(p.num_images)].tolist())]
    transform = ImageTransform(size, raw=True)

    def load(a: int, b: int, bad: dict):
        out, kept = [], []
        for i, r in enumerate(records[a:b], start=a):
            try:
                out.append(torch.as_tensor(transform(src.load(r))).permute(2, 0, 1))
                kept.append(i)
            except BadSample as e:  # counted, reported, left out of the scores
                bad["count"] += 1
                if len(bad["examples"]) < 5:
                    bad["examples"].append(f"{e.where}: {e.reason}")
        pixels = torch.stack(out) if out else torch.zeros(0, 3, size, size, dtype=torch.uint8)
        return pixels, kept

    out = Images([r.key for r in records], [list(r.captions) for r in records], load)
    out.rows_skipped = dict(skips.by_reason)
    return out


def shapes_accuracy(hyps: list[str], specs: list, lang: str) -> dict:
    """Per attribute, ``all`` and ``parsed``: the fraction of captions whose parsed spec matches the truth
    (a caption that does not parse is wrong on every attribute)."""
    from t2i.data.shapes import parse_caption

    parsed = [parse_caption(h, lang) for h in hyps]
    n = max(len(hyps), 1)
    acc = {a: sum(q is not None and getattr(q, a) == getattr(s, a) for q, s in zip(parsed, specs)) / n
           for a in ATTRIBUTES}
    acc["all"] = sum(q == s for q, s in zip(parsed, specs)) / n
    acc["parsed"] = sum(q is not None for q in parsed) / n
    return acc


def captioning(cfg: DictConfig, device) -> dict:
    from t2i.captioning import caption
    from t2i.eval.processes import autocast_dtype, gathered, rank_world, sha256
    from t2i.metrics.captioning import score_captions
    from t2i.pipeline.parts import parts_for as build
    from t2i.viz import captioned_rows

    p = cfg.eval
    settings = caption_settings(p)
    bs = cfg.batch_size
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        raise ConfigError(f"batch_size={bs} must be an integer >= 1")
    model, image_tok, tok, _ = build(cfg, device)
    model._need_captioning()  # one line naming model.captioning=true for a text -> image only checkpoint
    image_tok.eval()
    size = image_tok.downsample * model.grid[0]
    lang = str(p.get("lang", "zh"))
    rank, world = rank_world()
    amp = autocast_dtype(cfg, device)
    amp_ctx = (lambda: torch.autocast(device.type, dtype=amp)) if amp is not None else nullcontext
    splits = list(p.splits) if p.get("source") == "shapes" else [str(p.get("split_name", "val"))]
    result, grids, lines = {"splits": {}}, [], []
    for split in splits:
        data = (shapes_images(split, int(p.num_images), int(p.caption_seed), size, lang)
                if p.get("source") == "shapes" else source_images(p, size))
        n = len(data.keys)
        mine = [a for k, a in enumerate(range(0, n, bs)) if k % world == rank]
        rows, shown, t0 = [], [], time.perf_counter()
        for a in tqdm(mine, desc=f"{p.name} {split}", disable=not cfg.progress or rank != 0):
            pixels, kept = data.load(a, a + bs)
            if not kept:
                continue
            x = pixels.to(device).float() / 127.5 - 1
            g = torch.Generator(device=device).manual_seed(int(cfg.seed) + a)
            with torch.no_grad():
                codes = image_tok.encode(x)  # float32: the codes do not depend on autocast
                with amp_ctx():
                    ids = caption(model, codes, generator=g, **settings)
            texts = tok.decode(ids.cpu())
            rows += [(i, t) for i, t in zip(kept, texts)]
            shown += [(i, x[j].cpu(), t) for j, (i, t) in enumerate(zip(kept, texts)) if i < 8]
        rows = sorted((r for part in gathered(rows) for r in part), key=lambda r: r[0])
        shown = sorted((s for part in gathered(shown) for s in part), key=lambda s: s[0])
        bad = sum(gathered(data.bad["count"]))
        examples = [e for part in gathered(data.bad["examples"]) for e in part][:5]
        if bad:
            log.warning("eval %s %s: %d image(s) did not decode and are left out of the scores, e.g. %s",
                        p.name, split, bad, "; ".join(examples))
        if not rows:
            raise T2IError(f"eval={p.name} {split}: no image could be read, nothing to score")
        keys = [f"{i}" for i, _ in rows]  # positions: keys of a split need not be unique across readers
        hyps = {k: t for k, (_, t) in zip(keys, rows)}
        refs = {k: data.refs[i] for k, (i, _) in zip(keys, rows)}
        scores = score_captions(hyps, refs, lang)
        each = scores.pop("per_image")
        metrics = dict(scores)
        if data.specs is not None:
            metrics["acc"] = shapes_accuracy([t for _, t in rows], [data.specs[i] for i, _ in rows], lang)
        metrics.update(n=len(rows), skipped=bad, skipped_examples=examples, rows_skipped=data.rows_skipped,
                       seconds=time.perf_counter() - t0,
                       mean_length=sum(len(t) for _, t in rows) / len(rows))
        result["splits"][split] = metrics
        for k, (i, t) in zip(keys, rows):
            line = {"split": split, "key": data.keys[i], "caption": t, "references": data.refs[i], **each[k]}
            if data.specs is not None:
                from t2i.data.shapes import parse_caption

                q = parse_caption(t, lang)
                line.update(spec=data.specs[i].to_dict(), parsed=q.to_dict() if q is not None else None,
                            correct=q == data.specs[i])
            lines.append(line)
        if shown and rank == 0:
            labels = [f"{data.keys[s[0]]}: {s[2]}" for s in shown]
            if data.specs is not None:  # the parse in English, legible without a CJK font
                from t2i.data.shapes import caption as shapes_caption
                from t2i.data.shapes import parse_caption

                parsed = [parse_caption(s[2], lang) for s in shown]
                labels = [f"{t}  [{shapes_caption(q, 'en') if q is not None else 'does not parse'}]"
                          for t, q in zip(labels, parsed)]
            grids.append(captioned_rows(torch.stack([s[1] for s in shown]), labels, per_row=1, text_width=320))
    if rank == 0:
        out = Path(str(cfg.output))
        with open(out / "captions.jsonl", "w", encoding="utf-8") as f:
            for line in lines:
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
        if grids:
            width = max(g.shape[-1] for g in grids)
            pad = [torch.nn.functional.pad(g, (0, width - g.shape[-1]), value=1.0) for g in grids]
            save_image((torch.cat(pad, dim=2)[0] + 1) / 2, out / "captions.png")
    first = result["splits"][splits[0]]
    summary = {k: first[k] for k in ("bleu4", "cider", "rouge_l")}
    if p.get("source") == "shapes":
        for split in splits:
            summary["acc" + ("" if split == "test" else f"_{split}")] = result["splits"][split]["acc"]["all"]
    result["summary"] = summary
    result["checkpoints"] = {"transformer": str(cfg.ckpt), "transformer_sha256": sha256(cfg.ckpt)}
    result["protocol"] = {"image_size": size, "caption": settings, "lang": lang, "processes": world,
                          "tokenization": "one token per character (punctuation and spaces dropped)" if lang == "zh"
                          else "lowercase words (punctuation dropped)",
                          "cider": "CIDEr-D as pycocoevalcap.cider.Cider computes it (idf from the references)",
                          "autocast": str(amp).removeprefix("torch.") if amp else None}
    return result
