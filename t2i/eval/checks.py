"""Protocol settings checked before any model loads: one :class:`~t2i.errors.ConfigError` naming the key and
the values it takes (``eval.num_captions=0``, ``eval.splits=[validation]``, ``eval.lang=fr``, ...)."""

from __future__ import annotations

from collections.abc import Sequence

from t2i.errors import ConfigError

LANGS = ("zh", "en")
COUNTS = ("num_captions", "num_candidates", "num_images")  # null allowed where a protocol means "all"


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
