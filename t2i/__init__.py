"""t2i: two-stage text-to-image generation (image tokenizer + sparse transformer + CLIP rerank)."""

__version__ = "0.1.0"
