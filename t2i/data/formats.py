"""Readers for the formats Chinese text-to-image benchmarks ship in.

Every reader is a :class:`Source`. ``records(log)`` makes one cheap pass over the caption /
index files (no image is decoded) and returns :class:`Record` s; ``load(rec)`` decodes one
image. Bad rows are counted in a :class:`~t2i.data.skips.SkipLog` by reason and location,
never raised: ``records`` skips parse-level problems, ``load`` raises :class:`BadSample`.

``Record.ref`` says where the image bytes are:

* ``None`` -- caption-only record (no image shipped);
* ``Path`` -- an image file;
* ``(Path, offset)`` -- the TSV line starting at byte ``offset``; its last column is base64;
* ``(Path, offset, size)`` -- ``size`` raw bytes at ``offset`` (a member inside a tar);
* ``bytes`` -- the encoded image itself.
"""

from __future__ import annotations

import inspect
import re
import unicodedata
from collections import Counter
from pathlib import Path

from t2i.data.base import (
    IMAGE_EXTS,
    Record,
    Source,
    _lines,
    _need_file,
    _sibling_key,
    _utf8,
    captions_from_bytes,
    images_off_hint,
)
from t2i.data.skips import (
    BAD_COLUMNS,
    BAD_LINKS,
    BAD_UTF8,
    DUPLICATE,
    EMPTY_CAPTION,
    MISSING_CAPTION,
    MISSING_IMAGE,
    BadSample,
    DataError,
    SkipLog,
    require_path,
)
from t2i.data.wds import WebDataset

# -- 1. EasyNLP TSV --------------------------------------------------------------------------


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


# -- 1b. EasyNLP knowledge TSV (ARTIST) ---------------------------------------------------


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
            from t2i.pretrained.text import bert_tokenizer

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


def join_image_tsv(img_path: Path, caps: dict, wheres: dict, seen: set, log: SkipLog,
                   require_images: bool) -> list[Record]:
    """Records of ``caps`` (id -> captions) joined by id with an ``id \\t base64`` image TSV (MUGE's layout).
    ``wheres[id]``: the caption rows' locations; ``seen``: every id a caption row named, good or bad.
    Skips: bad_columns, duplicate (a repeated image id keeps its first line), missing_caption (an image
    no caption row named), missing_image (once per caption row of an id without image, when images are
    required; otherwise the record comes without an image)."""
    out, found = [], set()
    for lineno, offset, line in _lines(img_path):
        where = f"{img_path}:{lineno}"
        fields = line.split(b"\t")
        if len(fields) != 2:
            log.skip(BAD_COLUMNS, where)
            continue
        id_ = fields[0].decode("utf-8", "replace").strip()
        if id_ in found:
            log.skip(DUPLICATE, where)
            continue
        found.add(id_)
        if id_ in caps:
            out.append(Record(id_, caps[id_], (img_path, offset), where))
        elif id_ not in seen:
            log.skip(MISSING_CAPTION, where)
    for id_, c in caps.items():
        if id_ in found:
            continue
        if require_images:
            for where in wheres[id_]:
                log.skip(MISSING_IMAGE, where)
        else:
            out.append(Record(id_, c, None, wheres[id_][0]))
    return out


# -- 2. MUGE T2I -----------------------------------------------------------------------------


class MUGE(Source):
    """MUGE ECommerce-T2I: ``T2I_{split}.text.tsv`` (id, text) joined by id with ``T2I_{split}.img.tsv`` (id, base64).

    ``root`` is the folder holding the files, or one with an ``ECommerce-T2I/`` or
    ``{split}/`` sub-folder holding them. Several text rows for one id are several captions.
    Each text row of an id without image -> missing_image (text file:line); an image id with no
    text row at all -> missing_caption (img file:line); an image whose text rows were all bad is
    counted once per bad row only. A repeated image id keeps its first line; each later line is
    counted as duplicate (img file:line). Records follow the
    img file's order. With ``require_images=False`` ids without image become records with
    ``ref=None`` (after the others) instead, and a missing img.tsv is fine (the test split ships
    without one); with ``require_images`` a missing img.tsv is a DataError.
    :meth:`read_captions` reads the text file only.
    """

    name = "muge"

    def __init__(self, root, split: str = "train", require_images: bool = True, key: str = "input"):
        super().__init__(key)
        root = require_path(root, key, "MUGE folder")
        self.split, self.require_images = split, require_images
        text_name = f"T2I_{split}.text.tsv"
        for folder in (root, root / "ECommerce-T2I", root / split):
            if (folder / text_name).is_file():
                break
        else:
            raise DataError(
                f"{key}={root}: no {text_name} in it, nor in its ECommerce-T2I/ or {split}/ folder"
            )
        self.text_path = folder / text_name
        self.img_path = folder / f"T2I_{split}.img.tsv"

    def inputs(self) -> list[Path]:
        return [self.text_path, self.img_path]

    def _parse(self, log: SkipLog, require_images: bool, with_images: bool = True) -> list[Record]:
        caps: dict[str, list[str]] = {}
        wheres: dict[str, list[str]] = {}  # id -> locations of its good text rows
        seen: set[str] = set()  # ids with any text row, good or bad
        for lineno, _, line in _lines(self.text_path):
            where = f"{self.text_path}:{lineno}"
            fields = line.split(b"\t")
            if len(fields) > 1:
                seen.add(fields[0].decode("utf-8", "replace").strip())
            if len(fields) != 2:
                log.skip(BAD_COLUMNS, where)
                continue
            texts = _utf8(fields)
            if texts is None:
                log.skip(BAD_UTF8, where)
                continue
            id_, text = texts[0].strip(), texts[1].strip()
            if not text:
                log.skip(EMPTY_CAPTION, where)
                continue
            caps.setdefault(id_, []).append(text)
            wheres.setdefault(id_, []).append(where)
        if not with_images or not (require_images or self.img_path.is_file()):
            return [Record(i, c, None, wheres[i][0]) for i, c in caps.items()]
        if not self.img_path.is_file():
            raise DataError(
                f"{self.key}: {self.img_path} not found; MUGE's {self.split} split has captions only "
                f"here -- read them with {images_off_hint(self.key)}"
            )
        return join_image_tsv(self.img_path, caps, wheres, seen, log, require_images)

    def records(self, log: SkipLog) -> list[Record]:
        return self._parse(log, self.require_images)

    def read_captions(self, log: SkipLog | None = None) -> list[tuple[str, str]]:
        """(id, text) for every good text row; img.tsv is not read."""
        recs = self._parse(log or self.log, require_images=False, with_images=False)
        return [(r.key, c) for r in recs for c in r.captions]


# -- 2b. MUGE captioning (E-commerce IC) -----------------------------------------------------


class MUGECaption(Source):
    """MUGE E-commerce IC (image captioning) in the layout MUGE's baseline and OFA-Chinese read: a JSON-lines
    caption file, one object per image ``{"image_id": "<id>", "text": ["caption", ...]}`` (``text`` may also be
    one string), and an image TSV ``image_id \\t base64`` (url-safe or standard base64), joined by id.

    Files: ``captions`` / ``images`` when given (paths, or names inside ``root``); else ``IC_{split}.jsonl`` +
    ``IC_{split}.tsv`` (MUGE's names; splits train / valid / test) or OFA-Chinese's ``{split}_caption.jsonl`` +
    ``{split}_image.tsv``, in ``root``, ``root/ECommerce-IC/`` or ``root/{split}/``.
    Caption lines: not a JSON object, or without ``image_id`` / ``text`` -> bad_columns; not UTF-8 -> bad_utf8;
    no non-blank caption -> empty_caption (blank entries of a list with other captions are dropped); an id
    seen before -> duplicate (the first line is kept). Image lines as :class:`MUGE` reads them: bad_columns,
    duplicate, an image with no caption line -> missing_caption (img file:line); a caption line with no
    image -> missing_image (caption file:line). Records follow the image file's order. ``require_images=False``
    reads the caption file alone (records with ``ref=None``).
    """

    name = "muge_caption"

    def __init__(self, root=None, split: str = "valid", captions=None, images=None, require_images: bool = True,
                 key: str = "input"):
        super().__init__(key)
        self.split, self.require_images = split, require_images
        if root is None and not captions:
            raise DataError(f"{key}: give root=<the MUGE IC folder> (with IC_{split}.jsonl / IC_{split}.tsv) or "
                            f"captions=<.jsonl> and images=<.tsv>")
        base = require_path(root, key, "MUGE captioning folder") if root is not None else None
        if captions:
            cap = Path(str(captions)).expanduser()
            cap = base / cap if base is not None and not cap.is_absolute() and (base / cap).is_file() else cap
            self.caption_path = require_path(cap, _sibling_key(key, "captions"), "caption .jsonl")
            img = Path(str(images)).expanduser() if images else None
            if img is not None and base is not None and not img.is_absolute() and (base / img).is_file():
                img = base / img
            self.img_path = img
        else:
            names = [(f"IC_{split}.jsonl", f"IC_{split}.tsv"), (f"{split}_caption.jsonl", f"{split}_image.tsv")]
            found = next(((folder / c, folder / i) for folder in (base, base / "ECommerce-IC", base / split)
                          for c, i in names if (folder / c).is_file()), None)
            if found is None:
                raise DataError(f"{key}={base}: no IC_{split}.jsonl nor {split}_caption.jsonl in it, nor in its "
                                f"ECommerce-IC/ or {split}/ folder (or pass captions= and images=)")
            self.caption_path, self.img_path = found
            if images:
                self.img_path = Path(str(images)).expanduser()
        if require_images and (self.img_path is None or not self.img_path.is_file()):
            raise DataError(f"{key}: image TSV {self.img_path} not found (pass images=<id \\t base64 .tsv>, or read "
                            f"captions only with {images_off_hint(key)})")

    def inputs(self) -> list[Path]:
        return [self.caption_path] + ([self.img_path] if self.img_path is not None else [])

    def _captions(self, log: SkipLog) -> tuple[dict[str, list[str]], dict[str, str], set[str]]:
        import json

        caps: dict[str, list[str]] = {}
        wheres: dict[str, str] = {}
        seen: set[str] = set()  # ids of any caption line, good or bad
        for lineno, _, line in _lines(self.caption_path):
            where = f"{self.caption_path}:{lineno}"
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                log.skip(BAD_UTF8, where)
                continue
            try:
                obj = json.loads(text)
            except ValueError:
                obj = None
            if not isinstance(obj, dict) or "image_id" not in obj or "text" not in obj \
                    or not isinstance(obj["text"], (str, list)) or isinstance(obj["image_id"], (dict, list)):
                log.skip(BAD_COLUMNS, where)
                continue
            id_ = str(obj["image_id"]).strip()
            texts = [obj["text"]] if isinstance(obj["text"], str) else obj["text"]
            texts = [t.strip() for t in texts if isinstance(t, str) and t.strip()]
            if id_ in seen:
                log.skip(DUPLICATE, where)
                continue
            seen.add(id_)
            if not texts:
                log.skip(EMPTY_CAPTION, where)
                continue
            caps[id_], wheres[id_] = texts, where
        return caps, wheres, seen

    def records(self, log: SkipLog) -> list[Record]:
        caps, wheres, seen = self._captions(log)
        if not self.require_images and (self.img_path is None or not self.img_path.is_file()):
            return [Record(i, c, None, wheres[i]) for i, c in caps.items()]
        return join_image_tsv(self.img_path, caps, {i: [w] for i, w in wheres.items()}, seen, log,
                              self.require_images)

    def read_captions(self, log: SkipLog | None = None) -> list[tuple[str, str]]:
        """(id, caption) for every caption of every good line; the image TSV is not read."""
        caps, _, _ = self._captions(log or self.log)
        return [(i, c) for i, cs in caps.items() for c in cs]


# -- 3. COCO-CN ------------------------------------------------------------------------------


class COCOCN(Source):
    """COCO-CN: ids in ``coco-cn_{split}.txt``, captions in ``id#n \\t sentence`` lines, images from MS-COCO.

    ``root`` holds the text files (or its ``coco-cn-version1805v1.1/`` folder does).
    ``caption_file`` (default the human-written captions) may be a path or a name inside root.
    Images are looked up as ``image_dir/<id>.jpg``, then ``image_dir/<train2014|val2014>/<id>.jpg``
    after the id's prefix; ``image_dir`` defaults to root. Bad caption rows are counted only
    for ids of this split (and always when the id cannot be read); an id of the split with no
    caption row at all -> missing_caption, with no image file -> missing_image, listed again in the
    split -> duplicate (split file:line; the first line is kept).
    """

    name = "coco_cn"
    CAPTIONS = "imageid.human-written-caption.txt"

    def __init__(self, root, split: str = "train", image_dir=None, caption_file=None, key: str = "input"):
        super().__init__(key)
        root = require_path(root, key, "COCO-CN folder")
        if (root / "coco-cn-version1805v1.1").is_dir():
            root = root / "coco-cn-version1805v1.1"
        self.split = split
        self.split_path = _need_file(root / f"coco-cn_{split}.txt", key, root, f"COCO-CN split={split!r}")
        cap = Path(caption_file or self.CAPTIONS).expanduser()
        if not cap.is_absolute() and (root / cap).is_file():
            cap = root / cap
        self.caption_path = _need_file(cap, key, root, "COCO-CN caption file")
        self.image_dir = require_path(
            root if image_dir is None else image_dir, _sibling_key(key, "image_dir"), "image folder"
        )

    def inputs(self) -> list[Path]:
        return [self.split_path, self.caption_path]

    def _image_file(self, id_: str) -> Path | None:
        m = re.match(r"COCO_([a-z]+\d+)_", id_)
        for p in [self.image_dir / f"{id_}.jpg"] + (
            [self.image_dir / m.group(1) / f"{id_}.jpg"] if m else []
        ):
            if p.is_file():
                return p
        return None

    def records(self, log: SkipLog) -> list[Record]:
        caps: dict[str, list[str]] = {}
        bad: dict[str, list[tuple[str, str]]] = {}  # id -> [(reason, where)] of its bad rows
        for lineno, _, line in _lines(self.caption_path):
            where = f"{self.caption_path}:{lineno}"
            fields = line.split(b"\t")
            if len(fields) != 2:
                log.skip(BAD_COLUMNS, where)
                continue
            try:
                id_ = fields[0].decode("utf-8").strip().split("#", 1)[0]
            except UnicodeDecodeError:
                log.skip(BAD_UTF8, where)
                continue
            texts = _utf8(fields[1:])
            if texts is None or not texts[0].strip():
                bad.setdefault(id_, []).append((BAD_UTF8 if texts is None else EMPTY_CAPTION, where))
                continue
            caps.setdefault(id_, []).append(texts[0].strip())
        out, done = [], set()
        for lineno, _, line in _lines(self.split_path):
            where = f"{self.split_path}:{lineno}"
            try:
                id_ = line.decode("utf-8").strip().removesuffix(".jpg")
            except UnicodeDecodeError:
                log.skip(BAD_UTF8, where)
                continue
            if id_ in done:
                log.skip(DUPLICATE, where)
                continue
            done.add(id_)
            for reason, w in bad.get(id_, []):
                log.skip(reason, w)
            if id_ not in caps:
                if id_ not in bad:
                    log.skip(MISSING_CAPTION, where)
                continue
            image = self._image_file(id_)
            if image is None:
                log.skip(MISSING_IMAGE, where)
                continue
            out.append(Record(id_, caps[id_], image, where))
        return out


# -- 4. image folder -------------------------------------------------------------------------


class ImageFolder(Source):
    """Images anywhere under ``root`` (recursive, sorted), captions in the same-stem ``.txt``.

    Key = path relative to root without suffix (with suffix if two images share a stem).
    Hidden files and folders (name starting with '.') are ignored. An image without .txt is
    missing_caption (image path); a .txt whose stem has no image is missing_image (.txt path).
    """

    name = "folder"

    def __init__(self, root, key: str = "input", exts=IMAGE_EXTS):
        super().__init__(key)
        self.root = require_path(root, key, "image folder")
        self.exts = {"." + e.lower().lstrip(".") for e in exts}

    def records(self, log: SkipLog) -> list[Record]:
        files = sorted(
            p.relative_to(self.root)
            for p in self.root.rglob("*")
            if p.suffix.lower() in (*self.exts, ".txt") and p.is_file()
        )
        files = [p for p in files if not any(part.startswith(".") for part in p.parts)]
        images = [p for p in files if p.suffix.lower() in self.exts]
        stems = Counter(p.with_suffix("").as_posix() for p in images)
        for rel in files:
            if rel.suffix == ".txt" and rel.with_suffix("").as_posix() not in stems:
                log.skip(MISSING_IMAGE, str(self.root / rel))
        out = []
        for rel in images:
            path = self.root / rel
            txt = path.with_suffix(".txt")
            if not txt.is_file():
                log.skip(MISSING_CAPTION, str(path))
                continue
            try:
                captions = captions_from_bytes(txt.read_bytes(), str(txt))
            except BadSample as e:
                log.skip(e.reason, e.where)
                continue
            stem = rel.with_suffix("").as_posix()
            out.append(Record(stem if stems[stem] == 1 else rel.as_posix(), captions, path, str(path)))
        return out


# -- factory ---------------------------------------------------------------------------------

SOURCES: dict[str, type[Source]] = {
    "easynlp_tsv": EasyNLPTSV,
    "muge": MUGE,
    "coco_cn": COCOCN,
    "folder": ImageFolder,
    "wds": WebDataset,
    "easynlp_knowledge_tsv": EasyNLPKnowledgeTSV,
    "muge_caption": MUGECaption,
}


def open_source(source: str, *args, **kwargs) -> Source:
    """Build the reader named ``source`` (a key of :data:`SOURCES`) with its arguments."""
    cls = SOURCES.get(source)
    if cls is None:
        raise DataError(f"unknown data source {source!r}; valid: {', '.join(SOURCES)}")
    sig = inspect.signature(cls.__init__)
    try:
        sig.bind(None, *args, **kwargs)
    except TypeError as e:
        params = ", ".join(p for p in sig.parameters if p != "self")
        raise DataError(f"data source {source!r}: {e}; it takes ({params})") from None
    return cls(*args, **kwargs)
