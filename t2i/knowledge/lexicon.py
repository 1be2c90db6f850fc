"""Entity lexicon and linking for knowledge-enhanced text-to-image (ARTIST, issue 19).

An :class:`EntityLexicon` maps entity strings to the ids of its file. Two file forms are read:

* EasyNLP / OpenKE ``entity2id.txt``: one header line (usually the entity count), then
  ``entity<TAB>id`` lines. As EasyNLP's ``preprocess_data_knowl.py`` does, single-character
  entities are dropped (they would match almost every caption).
* a plain file, one entity a line; its id is the line number counted from 0 (blank lines keep
  their number and hold no entity). Single-character entities are dropped here too.

Linking finds every substring of a caption that is an entity (lattice style: overlaps allowed) with
one Aho-Corasick automaton (``ahocorasick_rs``: the Rust ``aho-corasick`` crate, which returns every
overlapping match of a caption in one native call, where pyahocorasick iterates in Python per match: 1.3x its
captions/s in ``link_many``, ``experiments/knowledge``), then orders the matches longest first (ties: leftmost)
and keeps at most ``max_entities``. Two matching rules, both documented for users:

* **case**: matching ignores case (entities and captions are lower-cased character by character, so
  char offsets stay those of the original caption). Our text tokenizers lower-case too, so a caption
  that differs from an entity only in case gives the same tokens.
* **whole words for alphabetic scripts**: an entity that starts (ends) with a letter or digit of a
  script written with spaces (Latin, Greek, Cyrillic, ...) only matches when the caption character
  before (after) it is not such a letter or digit: ``cat`` matches in ``a cat, sleeping`` and in
  ``cat毛衣`` but not in ``category``. CJK text has no word boundaries, so Chinese entities match
  anywhere (``苹果`` in ``苹果手机``), as in EasyNLP.

Ids are the file's ids; padding is -1 everywhere (never a real row). If one string appears twice
(or twice up to case), the first line wins.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from pathlib import Path

import ahocorasick_rs
import torch

from t2i.data.skips import DataError, require_path

FORMAT = "t2i-entity-lexicon/1"
_WORD_LIMIT = "\u2e80"  # below: scripts written with spaces between words; from here on: CJK & co.


def _is_word(c: str) -> bool:
    """A letter/digit of a space-separated script (whole-word matching applies to it)."""
    return c < _WORD_LIMIT and c.isalnum()


def fold(text: str) -> str:
    """Lower-case ``text`` without changing its length (chars whose lower case is longer stay as they are)."""
    low = text.lower()
    if len(low) == len(text):
        return low
    return "".join(lc if len(lc := c.lower()) == 1 else c for c in text)


class EntityLexicon:
    """Entity strings and their ids; :meth:`link` finds them in captions."""

    def __init__(self, names: list[str], ids: list[int], num_ids: int | None = None, min_chars: int = 2,
                 source: str = "<memory>"):
        if len(names) != len(ids):
            raise ValueError(f"{len(names)} names but {len(ids)} ids")
        self.min_chars = int(min_chars)
        self.source = source
        keep: dict[str, tuple[str, int]] = {}
        for name, i in zip(names, ids):
            if len(name) >= self.min_chars:
                keep.setdefault(fold(name), (name, int(i)))  # first line wins
        self.names = [n for n, _ in keep.values()]
        self.ids = [i for _, i in keep.values()]
        top = max(self.ids, default=-1) + 1
        self.num_ids = max(int(num_ids), top) if num_ids is not None else top
        self._auto = None
        self._meta: list[tuple[int, int, int]] = []
        self._has_word = False

    # -- reading -------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path, key: str = "knowledge.lexicon", min_chars: int = 2) -> EntityLexicon:
        """Read an EasyNLP ``entity2id.txt`` (``entity<TAB>id`` lines after a header) or a plain
        one-entity-a-line file. A malformed line is one :class:`DataError` naming ``file:line``."""
        p = require_path(path, key, kind="entity file (entity2id.txt or one entity a line)")
        try:
            text = p.read_bytes().decode("utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{key}={path}: not readable UTF-8 text ({e}); expected entity2id.txt "
                            "(`entity<TAB>id` lines after a header line) or one entity a line") from None
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        lines = [ln.rstrip("\r") for ln in lines]
        if not any(ln.strip() for ln in lines):
            raise DataError(f"{key}={path}: the entity file is empty")
        body = lines[1:] if len(lines) > 1 else lines
        tabbed = sum("\t" in ln for ln in body)
        names: list[str] = []
        ids: list[int] = []
        max_id = -1
        if tabbed * 2 >= max(1, sum(bool(ln.strip()) for ln in body)):  # entity2id.txt: header + entity<TAB>id
            for n, ln in enumerate(lines[1:], start=2):
                if not ln.strip():
                    continue
                parts = ln.strip().split("\t")
                name = parts[0].strip()
                ok = len(parts) == 2 and name and parts[1].strip().isdecimal()
                if not ok:
                    raise DataError(
                        f"{key}={path}:{n}: bad line {ln[:80]!r}; expected `entity<TAB>id` (id a non-negative "
                        "integer) after one header line, as EasyNLP's entity2id.txt"
                    )
                i = int(parts[1])
                max_id = max(max_id, i)
                names.append(name)
                ids.append(i)
        else:  # plain: one entity a line, id = line number from 0
            for n, ln in enumerate(lines):
                if "\t" in ln:
                    raise DataError(f"{key}={path}:{n + 1}: a tab in a one-entity-a-line file; use either "
                                    "`entity<TAB>id` lines after a header line (entity2id.txt) or plain names")
                max_id = n
                if ln.strip():
                    names.append(ln.strip())
                    ids.append(n)
        lex = cls(names, ids, num_ids=max_id + 1, min_chars=min_chars, source=str(path))
        if not lex.names:
            raise DataError(f"{key}={path}: no entity of {min_chars}+ characters in the file")
        return lex

    # -- travelling inside checkpoints -----------------------------------------------------
    def to_str(self) -> str:
        return json.dumps({"format": FORMAT, "names": self.names, "ids": self.ids, "num_ids": self.num_ids,
                           "min_chars": self.min_chars}, ensure_ascii=False)

    @classmethod
    def from_str(cls, s: str) -> EntityLexicon:
        try:
            d = json.loads(s)
            if d.get("format") != FORMAT:
                raise ValueError(f"format {d.get('format')!r}, expected {FORMAT!r}")
            return cls(d["names"], d["ids"], d["num_ids"], d.get("min_chars", 2), source="<stored>")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise DataError(f"stored entity lexicon is not valid ({e})") from None

    @property
    def fingerprint(self) -> str:
        blob = json.dumps([self.names, self.ids, self.num_ids, self.min_chars], ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"EntityLexicon({len(self)} entities, num_ids={self.num_ids}, fingerprint={self.fingerprint})"

    def __getstate__(self):  # DataLoader workers rebuild the automaton lazily
        d = dict(self.__dict__)
        d["_auto"] = None
        return d

    # -- linking ---------------------------------------------------------------------------
    def build(self) -> ahocorasick_rs.AhoCorasick:
        """The Aho-Corasick automaton over the case-folded names (built once, on first use)."""
        if self._auto is None:
            meta = []
            for name, i in zip(self.names, self.ids):
                meta.append((len(name), i, _is_word(name[0]) | (_is_word(name[-1]) << 1)))
            self._meta = meta
            self._neg_len, self._id_of = [-n for n, _, _ in meta], [i for _, i, _ in meta]
            self._has_word = any(flags for _, _, flags in meta)
            self._auto = ahocorasick_rs.AhoCorasick([fold(n) for n in self.names]) if self.names else None
        return self._auto

    def link(self, text: str, max_entities: int | None = 10) -> list[tuple[int, int, int]]:
        """``(entity_id, char_start, char_end)`` (end exclusive) of every entity in ``text``, overlaps
        allowed, longest first (ties: leftmost), at most ``max_entities`` (None: all)."""
        return self.link_many([text], max_entities)[0]

    def link_many(self, texts: list[str], max_entities: int | None = 10) -> list[list[tuple[int, int, int]]]:
        """:meth:`link` for each text."""
        if self._auto is None:
            self.build()
        if self._auto is None:  # an empty lexicon
            return [[] for _ in texts]
        find, meta, word = self._auto.find_matches_as_indexes, self._meta, self._has_word
        neg, ids = self._neg_len, self._id_of
        cap = None if max_entities is None else max(0, max_entities)
        out = []
        if not word:  # no entity starts or ends with a letter: no word boundaries to check (the hot path)
            for text in texts:
                t = text.lower()
                if len(t) != len(text):
                    t = fold(text)
                hits = [(neg[k], a, ids[k]) for k, a, _ in find(t, True)]  # True: every overlapping match
                if hits:
                    hits.sort()
                    if cap is not None:
                        del hits[cap:]
                    out.append([(i, a, a - mn) for mn, a, i in hits])
                else:
                    out.append(hits)
            return out
        for text in texts:
            t = text.lower()
            if len(t) != len(text):
                t = fold(text)
            hits = []
            for k, a, b in find(t, True):
                flags = meta[k][2]
                if flags and ((flags & 1 and a > 0 and _is_word(t[a - 1]))
                              or (flags & 2 and b < len(t) and _is_word(t[b]))):
                    continue  # inside a longer word
                hits.append((neg[k], a, ids[k]))
            hits.sort()
            if cap is not None:
                del hits[cap:]
            out.append([(i, a, a - mn) for mn, a, i in hits])
        return out


def entity_batch(links, offsets, text_len: int, max_entities: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Char-span links -> ``(ids LongTensor[B, E], spans LongTensor[B, E, 2])``, E = ``max_entities``.

    ``links[b]``: ``(entity_id, char_start, char_end)`` of caption b (as :meth:`EntityLexicon.link` gives);
    ``offsets[b]``: per token position the ``(char_start, char_end)`` of that token in caption b
    (:meth:`t2i.data.tokenizer.TextTokenizer.offsets`; specials are ``(0, 0)``). An entity's token span
    ``[start, end)`` runs from the first to the last token overlapping its characters. An entity not
    wholly inside the first ``text_len`` tokens (the caption was cut inside or before it) or covering no
    token is dropped; the rest keep their order and the first ``max_entities`` are kept. Rows are padded
    with id -1 and span ``(0, 0)``."""
    B = len(links)
    if max_entities <= 0:
        return torch.full((B, 0), -1, dtype=torch.long), torch.zeros((B, 0, 2), dtype=torch.long)
    pad = [-1, 0, 0]
    rows = []
    for b in range(B):
        row = []
        if links[b]:
            toks = [(a, e, p) for p, (a, e) in enumerate(offsets[b][:text_len]) if e > a]
            if toks:
                starts = [a for a, _, _ in toks]
                ends = [e for _, e, _ in toks]
                covered = ends[-1]
                for eid, cs, ce in links[b]:
                    if ce > covered or ce <= cs:
                        continue
                    first = bisect.bisect_right(ends, cs)  # first token ending after cs
                    last = bisect.bisect_left(starts, ce) - 1  # last token starting before ce
                    if first > last:
                        continue
                    row.append([int(eid), toks[first][2], toks[last][2] + 1])
                    if len(row) == max_entities:
                        break
        rows.append(row + [pad] * (max_entities - len(row)))
    t = torch.tensor(rows, dtype=torch.long).reshape(B, max_entities, 3)
    return t[..., 0].contiguous(), t[..., 1:].contiguous()


def load_lexicon(path, key: str = "knowledge.lexicon") -> EntityLexicon:
    """:meth:`EntityLexicon.from_file`, cached per (path, mtime) so datamodules share one automaton."""
    p = Path(path).expanduser()
    stamp = (str(p.resolve()) if p.exists() else str(p), p.stat().st_mtime_ns if p.exists() else None, key)
    lex = _CACHE.get(stamp)
    if lex is None:
        lex = _CACHE[stamp] = EntityLexicon.from_file(path, key=key)
    return lex


_CACHE: dict = {}
