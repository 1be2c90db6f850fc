"""Plain ``nn.Module`` models (no Lightning, no Hydra): image tokenizers, transformer, CLIP, SPADE, RRDBNet.

Image tokenizer contract (VQGAN and dVAE): ``encode(images) -> LongTensor[B, h, w]`` for float
images ``[B, 3, H, W]`` in [-1, 1]; ``decode(codes) -> images`` in [-1, 1]; attributes
``codebook_size`` and ``downsample`` (H // h). A model is written into a checkpoint and rebuilt from it
by :mod:`t2i.models.records`; :func:`t2i.pretrained.load_tokenizer` loads any image tokenizer
(ours or a public release) from a file or a spec.
"""


def __getattr__(name: str):
    # ``t2i.models.load_tokenizer`` is a documented name from before the registry moved to t2i.pretrained: kept
    # as a lazy alias (the one upward import tests/test_layers.py allows, listed there as COMPAT)
    if name == "load_tokenizer":
        from t2i.pretrained.image_tokenizers import load_tokenizer

        return load_tokenizer
    raise AttributeError(f"module 't2i.models' has no attribute {name!r}")
