"""EasyNLP TSV readers: ``idx \\t text \\t base64`` (pai-painter) and the knowledge TSV of ARTIST."""

from __future__ import annotations

import unicodedata
from collections import Counter
from pathlib import Path

from t2i.data.base import Record, Source, _lines, _sibling_key, _utf8, images_off_hint
from t2i.data.skips import (
    BAD_COLUMNS,
    BAD_LINKS,
    BAD_UTF8,
    DUPLICATE,
    EMPTY_CAPTION,
    DataError,
    SkipLog,
    require_path,
)


class EasyNLPTSV(Source):
    """EasyNLP TSV: ``idx \\t text \\t base64`` lines, or ``idx \\t text`` (captions only).

    The file's column count (2 or 3) is the one most of its lines have; other lines are
    ``bad_columns``. Each line is its own record with key ``idx``; an idx used on several
    good lines keeps its first line, the later ones are skipped as duplicate (file:line).
    Checks per line, first failing wins: bad_columns, bad_utf8 (idx/text), empty_caption,
    duplicate. A 2-column file (captions only)
    with ``require_images`` is a DataError: it has no image column.
    """

    name = "easynlp_tsv"

    def __init__(self, path, require_images: bool = True, key: str = "input"):
        super().__init__(key)
        self.path = require_path(path, key, "TSV file")
        self.require_images = require_images

    def inputs(self) -> list[Path]:
        return [self.path]

    text_columns = 2  # idx, text; the base64 image is the next column

    def _no_image_column(self, n: int, total: int) -> str:
        return (f"{self.key}={self.path}: no image column ({n} of {total} lines are `idx \\t text`, captions "
                f"only); give the 3-column `idx \\t text \\t base64` file, or read captions only with "
                f"{images_off_hint(self.key)}")

    def _extra(self, text: str, texts: list[str]) -> dict | None:
        """More Record fields from a row's text columns after idx and text; None: a bad row."""
        return {}

    def _parse(self, log: SkipLog, require_images: bool) -> list[Record]:
        rows = [(lineno, offset, line.split(b"\t")) for lineno, offset, line in _lines(self.path)]
        k = self.text_columns
        counts = Counter(len(fields) for _, _, fields in rows if len(fields) in (k, k + 1))
        ncols = k if counts[k] > counts[k + 1] else k + 1
        if ncols == k and require_images:
            raise DataError(self._no_image_column(counts[k], len(rows)))
        out, seen = [], set()
        for lineno, offset, fields in rows:
            where = f"{self.path}:{lineno}"
            if len(fields) != ncols:
                log.skip(BAD_COLUMNS, where)
                continue
            texts = _utf8(fields[:k])
            if texts is None:
                log.skip(BAD_UTF8, where)
                continue
            idx, text = texts[0].strip() or f"line{lineno}", texts[1].strip()
            if not text:
                log.skip(EMPTY_CAPTION, where)
                continue
            extra = self._extra(text, texts[2:])
            if extra is None:
                log.skip(BAD_LINKS, where)
                continue
            if idx in seen:
                log.skip(DUPLICATE, where)
                continue
            seen.add(idx)
            out.append(Record(idx, [text], (self.path, offset) if ncols == k + 1 else None, where, **extra))
        return out

    def records(self, log: SkipLog) -> list[Record]:
        return self._parse(log, self.require_images)

    def read_captions(self, log: SkipLog | None = None) -> list[tuple[str, str]]:
        """(key, text) for every good line, with or without an image column."""
        return [(r.key, r.captions[0]) for r in self._parse(log or self.log, require_images=False)]




def bert_word_spans(text: str) -> list[tuple[int, int]]:
    """Char spans of the tokens of BERT's basic tokenizer (whitespace split, then every CJK character and
    every punctuation character alone; NUL, U+FFFD and control characters removed first): EasyNLP's ``tokenizer.tokenize`` for
    Chinese text, where every word is also one WordPiece. A Latin word WordPiece splits into several
    pieces counts as one token here; give the reader the ``bert_vocab`` for exact positions."""
    from t2i.data.tokenizer import is_cjk

    spans, start = [], None
    for i, c in enumerate(text):
        cat = unicodedata.category(c)
        o = ord(c)
        if o == 0 or o == 0xFFFD or (cat.startswith("C") and c not in "\t\n\r"):
            continue  # BERT removes these before splitting: they join, not split, their neighbours
        split = c in " \t\n\r" or cat == "Zs"
        alone = not split and (is_cjk(c) or cat.startswith("P") or 33 <= o <= 47 or 58 <= o <= 64
                               or 91 <= o <= 96 or 123 <= o <= 126)
        if (split or alone) and start is not None:
            spans.append((start, i))
            start = None
        if alone:
            spans.append((i, i + 1))
        elif not split and start is None:
            start = i
    if start is not None:
        spans.append((start, len(text)))
    return spans


class EasyNLPKnowledgeTSV(EasyNLPTSV):
    """EasyNLP's ARTIST knowledge TSV (``preprocess_data_knowl.py``): ``idx \\t text \\t lex_ids \\t pos_s \\t
    pos_e \\t token_len \\t base64`` lines (or without the image column: captions only).

    The columns, as EasyNLP writes them: ``lex_ids`` the linked entity ids, space-separated (empty: none);
    ``token_len`` the number of BERT tokens of the caption (``BertTokenizer.tokenize``, no [CLS]);
    ``pos_s`` / ``pos_e`` space-separated, ``0 .. token_len-1`` (the characters) followed by each entity's
    first and last (inclusive) token position. The links are taken as given, in the file's order (EasyNLP
    keeps the first 10), and stored on the record as char spans of the caption: an entity covering tokens
    ``[ps, pe]`` spans from the start of token ``ps`` to the end of token ``pe``. Token char spans come from
    ``bert_vocab`` (EasyNLP's BERT ``vocab.txt``) when given, else from BERT's basic tokenizer
    (:func:`bert_word_spans`: exact for Chinese captions). A row whose ``token_len`` is not the caption's
    token count, or whose ids / positions do not parse or fit, is skipped as ``bad_links`` (file:line).
    Other checks as :class:`EasyNLPTSV` (bad_columns, bad_utf8, empty_caption, duplicate).
    """

    name = "easynlp_knowledge_tsv"

    text_columns = 6  # idx, text, lex_ids, pos_s, pos_e, token_len

    def __init__(self, path, require_images: bool = True, bert_vocab=None, key: str = "input"):
        super().__init__(path, require_images, key)
        self._tok = None
        if bert_vocab:
            from t2i.data.vocabs import bert_tokenizer

            self._tok = bert_tokenizer(bert_vocab, key=_sibling_key(key, "bert_vocab"))

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        if self._tok is None:
            return bert_word_spans(text)
        return [tuple(o) for o in self._tok.tok.encode(text, add_special_tokens=False).offsets]

    def _no_image_column(self, n: int, total: int) -> str:
        return (f"{self.key}={self.path}: no image column ({n} of {total} lines have the 6 columns idx, text, "
                f"lex_ids, pos_s, pos_e, token_len: captions only); give the 7-column file with imgbase64, or "
                f"read captions only with {images_off_hint(self.key)}")

    def _extra(self, text: str, texts: list[str]) -> dict | None:
        links = self._links(text, texts)
        return None if links is None else {"links": [links]}

    def _links(self, text: str, fields: list[str]) -> list[tuple[int, int, int]] | None:
        try:
            ids = [int(x) for x in fields[0].split()]
            pos_s = [int(x) for x in fields[1].split()]
            pos_e = [int(x) for x in fields[2].split()]
            n = int(fields[3])
        except ValueError:
            return None
        if n < 0 or len(pos_s) != n + len(ids) or len(pos_e) != len(pos_s) or any(i < 0 for i in ids):
            return None
        spans = self.token_spans(text)
        if len(spans) != n:
            return None
        out = []
        for i, a, b in zip(ids, pos_s[n:], pos_e[n:]):
            if not 0 <= a <= b < n:
                return None
            out.append((i, spans[a][0], spans[b][1]))
        return out
