"""t2i: two-stage text-to-image generation (image tokenizer + sparse transformer + CLIP rerank).

    from t2i import Pipeline
    pipe = Pipeline.from_checkpoint("<run>/checkpoints/best.ckpt", reranker="<clip run>/checkpoints/best.ckpt")
    out = pipe(["一个大的红色圆形在左上角"], num_samples=8, seed=0)

``Pipeline``, ``Synthesizer``, ``load`` and ``identify`` are imported on first use (:mod:`t2i.pipeline`):
``import t2i`` stays fast and needs neither Hydra nor Lightning.
"""

__version__ = "0.1.0"
_EXPORTS = ("Pipeline", "Generation", "Synthesizer", "Synthesis", "load", "identify")
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        import t2i.pipeline

        return getattr(t2i.pipeline, name)
    raise AttributeError(f"module 't2i' has no attribute {name!r}")
