"""Moved to :mod:`t2i.pipeline.rerank`; this name stays importable (``from t2i.rerank import load_reranker``)."""

from t2i.pipeline.rerank import *  # noqa: F401,F403
