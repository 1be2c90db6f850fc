"""t2i-caption: images -> captions with the image -> text direction of a transformer checkpoint.

    t2i-caption ckpt=<shapes_bidirectional run>/checkpoints/best.ckpt images=shapes:test num_images=16
    t2i-caption ckpt=<run>/checkpoints/best.ckpt images=photos/ caption.method=sample caption.top_k=8

``images``: a folder (every .png/.jpg/.jpeg/.webp/.bmp in it, sorted), webdataset shards (a glob or a list of
``.tar``), or ``shapes:<split>`` (the benchmark's images). Each image is resized (shorter side) and centre-cropped
to the model's resolution, encoded with the checkpoint's image tokenizer and captioned in batches with the KV cache
(``caption.method`` greedy | beam | sample; :func:`t2i.captioning.caption`). Files that do not decode are skipped,
counted and named in one warning. Output: ``captions.jsonl`` (key, caption, method, settings) and
``captions.png`` (the first 32 images with their captions).
"""

from __future__ import annotations

import glob
import json
import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torchvision.utils import save_image
from tqdm.auto import tqdm

from t2i import checks
from t2i.cli.common import clear_errors
from t2i.errors import ConfigError

log = logging.getLogger("t2i.caption")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _tokenizer_override(key, value):
    """A stage-1 .ckpt path, or a '{kind: ..., files: {...}}' spec (checked where it is read)."""
    if not isinstance(value, dict):
        checks.file(optional=True)(key, value)


# every key of conf/caption.yaml, checked before any model loads
KEYS = {
    "ckpt": checks.file(what="transformer .ckpt trained with model.model.captioning=true"),
    "images": checks.text(), "num_images": checks.count(optional=True), "lang": checks.choice("zh", "en"),
    "caption.method": checks.choice("greedy", "beam", "sample"), "caption.beam_size": checks.count(),
    "caption.length_penalty": checks.number(), "caption.top_k": checks.count(optional=True),
    "caption.top_p": checks.number(0, 1, low_open=True, optional=True), "caption.temperature": checks.number(0),
    "caption.use_cache": checks.boolean(), "batch_size": checks.count(), "seed": checks.integer(),
    "device": checks.device(), "ema": checks.boolean(), "image_tokenizer": _tokenizer_override,
    "text_tokenizer": checks.file(optional=True, utf8=True), "output": checks.output_folder(),
    "progress": checks.boolean(),
}


def image_source(spec: str, n: int | None, size: int, lang: str):
    """``(keys, load(a, b, bad) -> (uint8 [k, 3, S, S], kept indices))`` for ``images=``."""
    from t2i.eval.captioning import shapes_images, source_images

    if spec.startswith("shapes:"):
        data = shapes_images(spec.split(":", 1)[1], int(n or 16), 0, size, lang)
        return data.keys, data._load
    p = Path(spec).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTS)[:n]
        if not files:
            raise ConfigError(f"images={spec}: no image files ({', '.join(IMAGE_EXTS)}) in the folder")
        from PIL import Image

        from t2i.data.transforms import ImageTransform

        transform = ImageTransform(size, raw=True)

        def load(a: int, b: int, bad: dict):
            out, kept = [], []
            for i, f in enumerate(files[a:b], start=a):
                try:
                    with Image.open(f) as im:
                        out.append(torch.as_tensor(transform(im.convert("RGB"))).permute(2, 0, 1))
                    kept.append(i)
                except Exception as e:  # a file that is not an image: counted and named
                    bad["count"] += 1
                    if len(bad["examples"]) < 5:
                        bad["examples"].append(f"{f}: {type(e).__name__}")
            return (torch.stack(out) if out else torch.zeros(0, 3, size, size, dtype=torch.uint8)), kept

        return [str(f.relative_to(p)) for f in files], load
    if glob.glob(str(p)) or spec.endswith(".tar"):
        cfg = OmegaConf.create({"source": "wds", "split": spec, "num_images": n, "caption_seed": 0,
                                "max_bad_fraction": 1.0, "name": "caption"})
        data = source_images(cfg, size)
        return data.keys, data._load
    raise ConfigError(f"images={spec}: not a folder, shards or shapes:<split>")


def run(cfg: DictConfig) -> dict:
    from t2i.eval.captioning import caption_settings
    from t2i.pipeline import Pipeline
    from t2i.viz import captioned_rows

    if not cfg.ckpt or not cfg.images:
        raise ConfigError("t2i-caption needs ckpt=<transformer .ckpt with captioning> and images=<folder | shards | "
                          "shapes:<split>>")
    checks.check_keys(cfg, KEYS)
    settings = caption_settings(cfg, prefix="")
    pipe = Pipeline.from_checkpoint(cfg.ckpt, device=str(cfg.device), ema=bool(cfg.ema),
                                    image_tokenizer=cfg.image_tokenizer or None, text_tokenizer=cfg.text_tokenizer or None)
    pipe.model._need_captioning()
    keys, load = image_source(str(cfg.images), cfg.num_images, pipe.image_size, str(cfg.lang))
    out = Path(str(cfg.output)).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    bad = {"count": 0, "examples": []}
    rows, shown = [], []
    bs = int(cfg.batch_size)
    for a in tqdm(range(0, len(keys), bs), desc="captioning", disable=not cfg.progress):
        pixels, kept = load(a, a + bs, bad)
        if not kept:
            continue
        texts = pipe.caption(pixels, seed=int(cfg.seed) + a, batch_size=bs, **settings)
        for j, (i, text) in enumerate(zip(kept, texts)):
            rows.append({"key": keys[i], "caption": text, **settings})
            if len(shown) < 32:
                shown.append((pixels[j].float() / 127.5 - 1, f"{keys[i]}: {text}"))
    if bad["count"]:
        log.warning("%d image(s) did not decode and were skipped, e.g. %s", bad["count"], "; ".join(bad["examples"]))
    with open(out / "captions.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    if shown:
        grid = captioned_rows(torch.stack([s[0] for s in shown]), [s[1] for s in shown], per_row=1, text_width=320)
        save_image((grid[0] + 1) / 2, out / "captions.png")
    print(f"captioned {len(rows)} image(s) ({bad['count']} skipped) -> {out / 'captions.jsonl'}")
    return {"output": str(out), "count": len(rows), "skipped": bad["count"], "rows": rows}


@hydra.main(version_base="1.3", config_path="../conf", config_name="caption")
@clear_errors
def main(cfg: DictConfig) -> None:
    OmegaConf.resolve(cfg)
    run(cfg)


if __name__ == "__main__":
    main()
