"""COCO-CN: Chinese captions of COCO images."""

from __future__ import annotations

import re
from pathlib import Path

from t2i.data.base import Record, Source, _lines, _need_file, _sibling_key, _utf8
from t2i.data.skips import (
    BAD_COLUMNS,
    BAD_UTF8,
    DUPLICATE,
    EMPTY_CAPTION,
    MISSING_CAPTION,
    MISSING_IMAGE,
    SkipLog,
    require_path,
)


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
