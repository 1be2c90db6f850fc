"""Moved to :mod:`t2i.pipeline.rerank`; this name stays importable (``from t2i.rerank import load_reranker``)."""

from t2i.pipeline.rerank import *  # noqa: F401,F403
from t2i.pipeline.rerank import (  # noqa: F401
    BACKENDS,
    Ranked,
    Reranking,
    load_reranker,
    rank_table,
    rerank,
    score,
    score_table,
)
