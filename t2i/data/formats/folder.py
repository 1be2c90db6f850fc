"""An image folder: images with sibling caption files."""

from __future__ import annotations

from collections import Counter

from t2i.data.base import IMAGE_EXTS, Record, Source, captions_from_bytes
from t2i.data.skips import MISSING_CAPTION, MISSING_IMAGE, BadSample, SkipLog, require_path


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
