"""Protocol settings checked before any model loads: one :class:`~t2i.errors.ConfigError` naming the key and
the values it takes (``eval.num_captions=0``, ``eval.splits=[validation]``, ``eval.lang=fr``, ...)."""

from __future__ import annotations

from collections.abc import Sequence

from t2i import checks
from t2i.errors import ConfigError

LANGS = ("zh", "en")
COUNTS = ("num_captions", "num_candidates", "num_images")  # null allowed where a protocol means "all"


# typed keys of t2i-eval the protocol checks below and the loaders do not see (checked before any model loads)
KEYS = {
    "tokenizer_ckpt": checks.file(optional=True, what="image tokenizer .ckpt"),
    "ema": checks.boolean(), "progress": checks.boolean(), "seed": checks.integer(),
    "output": checks.output_folder(),
    "clip.ckpt": checks.file(optional=True, what="CLIP checkpoint or weights file"),
    "clip.backend": checks.choice("t2i", "open_clip", "cn_clip"),
    "clip.model_name": checks.text(optional=True),
    "sample.use_cache": checks.boolean(),
    "metrics.feature_extractor_weights_path": checks.file(optional=True, what="Inception weights file"),
    "metrics.inception_score": checks.boolean(), "metrics.is_splits": checks.count(),
    "metrics.clip_score": checks.boolean(), "metrics.fd_clip": checks.boolean(), "metrics.lpips": checks.boolean(),
    "metrics.vgg_path": checks.file(optional=True, what="VGG16 weights file"),
    "metrics.cache_dir": checks.output_folder(optional=True, what="folder for the cached real statistics"),
    "eval.caption_seed": checks.integer(),
}


def check_keys(cfg) -> None:
    """The typed keys of a ``t2i-eval`` config (:data:`KEYS`) and its protocol (:func:`check_protocol`)."""
    checks.check_keys(cfg, KEYS)
    check_protocol(cfg.eval)


def shapes_splits(p) -> tuple[str, ...]:
    """The splits a Shapes protocol can draw from (Shapes-KG has its own held-out split)."""
    if p.get("benchmark") == "shapes_kg":
        from t2i.data.shapes_kg import SPLITS
    else:
        from t2i.data.shapes import SPLITS
    return SPLITS


def check_count(key: str, v, allow_none: bool = False) -> None:
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"{key}={v} must be an integer >= 1" + (" (or null: all)" if allow_none else ""))


def check_protocol(p) -> None:
    """Counts, splits and language of the ``eval`` block ``p``."""
    for name in COUNTS:
        if name in p:
            check_count(f"eval.{name}", p.get(name), allow_none=name == "num_images")
    if "lang" in p and p.get("lang") not in LANGS:
        raise ConfigError(f"eval.lang={p.get('lang')} is unknown; use zh or en")
    if p.get("kind") == "shapes":
        splits = p.get("splits")
        allowed = shapes_splits(p)
        if isinstance(splits, str) or not isinstance(splits, Sequence):  # a ListConfig is a Sequence
            raise ConfigError(f"eval.splits={splits} must be a list, e.g. eval.splits=[{allowed[2]}]; use some of "
                              f"{', '.join(allowed)}")
        if not splits:
            raise ConfigError(f"eval.splits=[] names no split; use some of {', '.join(allowed)}")
        for s in splits:
            if s not in allowed:
                raise ConfigError(f"eval.splits={[str(x) for x in splits]}: unknown split {s!r}; use some of "
                                  f"{', '.join(allowed)}")
