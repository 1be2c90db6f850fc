"""MUGE readers: ECommerce-T2I (text-to-image) and E-commerce IC (captioning), both a caption file joined
by id with an ``id \\t base64`` image TSV (:func:`join_image_tsv`)."""

from __future__ import annotations

from pathlib import Path

from t2i.data.base import Record, Source, _lines, _sibling_key, _utf8, images_off_hint
from t2i.data.skips import (
    BAD_COLUMNS,
    BAD_UTF8,
    DUPLICATE,
    EMPTY_CAPTION,
    MISSING_CAPTION,
    MISSING_IMAGE,
    DataError,
    SkipLog,
    require_path,
)


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
