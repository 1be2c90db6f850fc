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

from t2i.data.base import Source
from t2i.data.formats.coco_cn import COCOCN
from t2i.data.formats.easynlp import EasyNLPKnowledgeTSV, EasyNLPTSV, bert_word_spans
from t2i.data.formats.folder import ImageFolder
from t2i.data.formats.muge import MUGE, MUGECaption, join_image_tsv
from t2i.data.skips import DataError
from t2i.data.wds import WebDataset

__all__ = ["COCOCN", "MUGE", "SOURCES", "EasyNLPKnowledgeTSV", "EasyNLPTSV", "ImageFolder", "MUGECaption",
           "WebDataset", "bert_word_spans", "join_image_tsv", "open_source"]


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
