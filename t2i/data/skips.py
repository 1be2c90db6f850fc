"""Bookkeeping for bad input: every skipped row is counted by reason with its location.

Readers call ``log.ok()`` for every good sample and ``log.skip(reason, where)`` for every
bad one; ``log.check()`` raises one clear :class:`DataError` when the skipped fraction
passes ``max_bad_fraction``, naming the file with the most bad rows and the override that raises the limit
(``key``: ``data.max_bad_fraction`` in the training configs; a command whose key is another passes its own).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

from t2i.errors import T2IError

# Reasons a sample can be skipped. Readers use exactly these strings so reports and tests agree.
BAD_BASE64 = "bad_base64"  # image column is not valid (standard or url-safe) base64
BAD_IMAGE = "bad_image"  # bytes do not decode to an image (truncated, corrupt, unknown format)
MISSING_IMAGE = "missing_image"  # caption row whose image id / file is absent
MISSING_CAPTION = "missing_caption"  # image without any caption
BAD_COLUMNS = "bad_columns"  # TSV row with the wrong number of columns
EMPTY_CAPTION = "empty_caption"  # caption column present but blank
BAD_UTF8 = "bad_utf8"  # row or caption file is not valid UTF-8
DUPLICATE = "duplicate"  # a repeated id whose first occurrence is kept
BAD_LINKS = "bad_links"  # knowledge TSV row whose entity ids / positions do not fit its caption
REASONS = (
    BAD_BASE64, BAD_IMAGE, MISSING_IMAGE, MISSING_CAPTION, BAD_COLUMNS, EMPTY_CAPTION, BAD_UTF8, DUPLICATE,
    BAD_LINKS,
)


class DataError(T2IError):
    """A user-facing data problem: bad path, too many bad rows. The message says what to fix."""


class BadSample(Exception):
    """Raised by a loader for one sample; carries the skip reason and location."""

    def __init__(self, reason: str, where: str, detail: str = ""):
        super().__init__(f"{reason} at {where}" + (f": {detail}" if detail else ""))
        self.reason, self.where, self.detail = reason, where, detail


def require_path(path, key: str, kind: str = "file or folder") -> Path:
    """Return ``Path(path)`` or raise one line naming the path and the config key that set it."""
    if path is None or str(path) == "":
        raise DataError(f"{key} is not set: give the {kind} with `{key}=...`")
    p = Path(str(path)).expanduser()
    if not p.exists():
        raise DataError(f"{key}={path}: no such {kind} (set `{key}=` to an existing path)")
    return p


def file_of(where: str) -> str:
    """``'a/b.tsv:12'`` -> ``'a/b.tsv'``; ``'x.tar:key'`` -> ``'x.tar'``."""
    head, sep, tail = where.rpartition(":")
    return head if sep and head else where


class SkipLog:
    """Counts good and skipped samples; reasons, locations and per-file totals of the bad ones."""

    reasons: tuple[str, ...] = REASONS

    def __init__(self, max_bad_fraction: float = 0.01, name: str = "data", keep_examples: int = 5,
                 key: str = "data.max_bad_fraction"):
        self.max_bad_fraction = float(max_bad_fraction)
        self.name = name
        self.key = key  # the override that sets max_bad_fraction in the command reading this data, for the hint
        self.keep_examples = keep_examples
        self.n_ok = 0
        self.by_reason: Counter[str] = Counter()
        self.by_file: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = defaultdict(list)

    # -- counting -------------------------------------------------------------------------
    def ok(self, n: int = 1) -> None:
        self.n_ok += n

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        """Count one bad sample; ``detail`` (what is wrong with it) goes beside its location in the examples."""
        if reason not in self.reasons:
            raise ValueError(f"unknown skip reason {reason!r}; use one of {self.reasons}")
        self.by_reason[reason] += 1
        self.by_file[file_of(where)] += 1
        if len(self.examples[reason]) < self.keep_examples:
            self.examples[reason].append(f"{where} ({detail})" if detail else where)

    def merge(self, other: SkipLog | dict) -> SkipLog:
        d = other.to_dict() if isinstance(other, SkipLog) else other
        self.n_ok += d["n_ok"]
        self.by_reason.update(d["by_reason"])
        self.by_file.update(d["by_file"])
        for reason, wheres in d["examples"].items():
            room = self.keep_examples - len(self.examples[reason])
            self.examples[reason].extend(wheres[: max(room, 0)])
        return self

    def reset(self) -> None:
        self.n_ok = 0
        self.by_reason.clear()
        self.by_file.clear()
        self.examples.clear()

    # -- reading ----------------------------------------------------------------------------
    @property
    def n_bad(self) -> int:
        return sum(self.by_reason.values())

    @property
    def total(self) -> int:
        return self.n_ok + self.n_bad

    @property
    def fraction(self) -> float:
        return self.n_bad / self.total if self.total else 0.0

    def to_dict(self) -> dict:
        return {
            "n_ok": self.n_ok,
            "by_reason": dict(self.by_reason),
            "by_file": dict(self.by_file),
            "examples": {k: list(v) for k, v in self.examples.items()},
        }

    def summary(self) -> str:
        """Human summary: one line of totals, then one line per reason with example locations."""
        lines = [f"{self.name}: {self.n_ok} ok, {self.n_bad} skipped ({100 * self.fraction:.2f}%)"]
        for reason, n in sorted(self.by_reason.items(), key=lambda kv: (-kv[1], kv[0])):
            ex = ", ".join(self.examples.get(reason, []))
            lines.append(f"  {reason}: {n}" + (f" (e.g. {ex})" if ex else ""))
        return "\n".join(lines)

    def check(self) -> None:
        """Raise :class:`DataError` if the skipped fraction passes ``max_bad_fraction``."""
        if self.total and self.fraction > self.max_bad_fraction:
            worst, n = self.by_file.most_common(1)[0]
            reasons = ", ".join(f"{r}={c}" for r, c in self.by_reason.most_common())
            raise DataError(
                f"{self.name}: {self.n_bad} of {self.total} samples were bad "
                f"({100 * self.fraction:.2f}% > {self.key}={self.max_bad_fraction}); "
                f"worst file: {worst} ({n} bad). Reasons: {reasons}. "
                f"Fix the data or raise {self.key}."
            )
