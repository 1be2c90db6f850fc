"""t2i-import: released weights as ordinary t2i checkpoints, through one front door.

    t2i-import easynlp input=artist_base.tgz output=models/artist_base.ckpt
    t2i-import rudalle input=pytorch_model_v3.bin tokenizer=bpe.model vae=vqgan.gumbelf8-sber.model.ckpt output=models/malevich.ckpt
    t2i-import realesrgan input=RealESRGAN_x4.pth output=models/sr_x4.ckpt
    t2i-import taming input=last.ckpt config=model.yaml output=models/vqgan.ckpt
    t2i-import openai input=encoder.pkl decoder=decoder.pkl output=models/dvae.ckpt

``easynlp`` (pai-painter / ARTIST, :mod:`t2i.pretrained.easynlp`) and ``rudalle`` (Malevich,
:mod:`t2i.pretrained.rudalle`) give a transformer checkpoint carrying its text tokenizer and image
tokenizer: ``t2i-generate ckpt=``, ``t2i-eval ckpt=`` and ``t2i-train ... init_from=`` read it.
``realesrgan`` gives an upsampler for ``t2i-generate sr.ckpt=``; ``taming`` / ``openai`` an image
tokenizer for ``model.image_tokenizer=`` or ``t2i-tokenize tokenizer_ckpt=``. Every file is read
without running code from it unless ``trust_pickle=true``; weights are loaded strictly, and a file
that does not fit is one error naming it and the first keys that differ. The output is written to a
temporary file and renamed, so a failed import leaves nothing behind.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from t2i import checks
from t2i.cli.common import clear_errors, first_word_as
from t2i.errors import ConfigError

SOURCES = ("easynlp", "rudalle", "realesrgan", "taming", "openai")


def _version(key, value):
    if value != "v3":
        raise ConfigError(f"{key}={checks.show(value)}: only ruDALL-E v3 weights (Malevich, Surrealist_XL, Kandinsky) "
                          "are supported")


def _image_tokenizer(key, value):
    """A stage-1 .ckpt, or a '{kind: ..., files: {...}}' spec (checked where it is read)."""
    if not isinstance(value, dict):
        checks.file(optional=True, what="image-tokenizer .ckpt")(key, value)


# every key of conf/import.yaml, checked before any file is read
KEYS = {
    "input": checks.path(what="release file or folder"), "output": checks.output_file(what=".ckpt to write"),
    "trust_pickle": checks.boolean(), "vocab": checks.file(optional=True, utf8=True, what="vocab.txt"),
    "text_len": checks.count(optional=True), "vqgan_config": checks.file(optional=True, utf8=True, what="taming YAML"),
    "image_tokenizer": _image_tokenizer, "entities": checks.file(optional=True, utf8=True, what="entity2id.txt"),
    "vectors": checks.file(optional=True, what="entity2vec.pt"), "tokenizer": checks.file(optional=True, what="bpe.model"),
    "vae": checks.file(optional=True, what="VQGAN .ckpt"),
    "vae_config": checks.file(optional=True, utf8=True, what="taming YAML"), "n_head": checks.count(optional=True),
    "version": _version, "scale": checks.choice(1, 2, 4, 8, optional=True),
    "config": checks.file(optional=True, utf8=True, what="taming YAML"),
    "decoder": checks.file(optional=True, what="decoder.pkl"),
}


def _need(cfg: DictConfig, *keys: str) -> None:
    missing = [k for k in keys if not cfg.get(k)]
    if missing:
        raise ConfigError(f"t2i-import {cfg.source}: set {', '.join(f'{k}=' for k in missing)} (see `t2i-import "
                          f"--help` or conf/import.yaml)")


def tokenizer_file(model, output, meta: dict) -> Path:
    """An image-tokenizer checkpoint: the carried-record layout :func:`t2i.pretrained.load_tokenizer` reads."""
    from t2i.keys import IMAGE_TOKENIZER_KEY
    from t2i.models.records import tokenizer_record
    from t2i.pretrained.export import IMPORT_KEY, save_atomic

    return save_atomic({IMAGE_TOKENIZER_KEY: tokenizer_record(model), IMPORT_KEY: meta}, output)


def run(cfg: DictConfig) -> Path:
    from t2i.pretrained.export import provenance, save_atomic, transformer_checkpoint

    if cfg.source not in SOURCES:
        raise ConfigError(f"t2i-import: unknown source {cfg.source!r}; use one of {', '.join(SOURCES)}")
    _need(cfg, "input", "output")
    checks.check_keys(cfg, KEYS)
    if cfg.source != "easynlp":  # easynlp: its folder or .tgz; every other release is one file
        checks.file(what=f"{cfg.source} weights file")("input", cfg.input)
    trust = bool(cfg.trust_pickle)
    if cfg.source in ("easynlp", "rudalle"):
        if cfg.source == "easynlp":
            from t2i.pretrained.easynlp import load_easynlp

            parts = load_easynlp(cfg.input, vocab=cfg.vocab, text_len=int(cfg.text_len or 32),
                                 vqgan_config=cfg.vqgan_config, image_tokenizer=cfg.image_tokenizer, trust_pickle=trust,
                                 entities=cfg.get("entities"), vectors=cfg.get("vectors"))
            weights = (0.0, 1.0)  # ARTIST has no text head: the image loss alone
        else:
            from t2i.pretrained.rudalle import load_rudalle

            _need(cfg, "tokenizer", "vae")
            parts = load_rudalle(cfg.input, cfg.tokenizer, cfg.vae, cfg.vae_config, text_len=int(cfg.text_len or 128),
                                 n_head=cfg.n_head, version=str(cfg.version), trust_pickle=trust)
            weights = (1.0, 7.0)
        config, state, text_tok, image_tok, meta = parts
        ckpt = transformer_checkpoint(config, state, text_tok, image_tok, f"{cfg.source} input={cfg.input}", meta,
                                      loss_weights=weights)
        out = save_atomic(ckpt, cfg.output)
        n = sum(v.numel() for k, v in ckpt["state_dict"].items())
        print(f"imported {cfg.source} -> {out}: transformer {n / 1e6:.1f}M parameters, {config['n_layer']} layers x "
              f"{config['d_model']}, text {config['text_len']} + image {config['image_grid'][0]}x"
              f"{config['image_grid'][1]}; image tokenizer {image_tok.codebook_size} codes; text tokenizer "
              f"{text_tok.vocab_size} ids")
        return out
    if cfg.source == "realesrgan":
        from t2i.pretrained.realesrgan import import_realesrgan

        out = import_realesrgan(cfg.input, cfg.output, scale=cfg.scale, trust_pickle=trust)
        print(f"imported realesrgan -> {out}")
        return out
    if cfg.source == "taming":
        from t2i.pretrained.taming import find_taming_config, load_taming_vqgan

        config = cfg.config or find_taming_config(cfg.input)
        model = load_taming_vqgan(cfg.input, config, trust_pickle=trust)
        files = {"ckpt": cfg.input, "config": config}
    else:
        from t2i.pretrained.openai import load_openai_dvae

        _need(cfg, "decoder")
        model = load_openai_dvae(cfg.input, cfg.decoder, trust_pickle=trust)
        files = {"ckpt": cfg.input, "decoder": cfg.decoder}
    out = tokenizer_file(model, cfg.output, provenance(cfg.source, files))
    print(f"imported {cfg.source} -> {out}: image tokenizer, {model.codebook_size} codes, downsample "
          f"{model.downsample}")
    return out


@hydra.main(version_base="1.3", config_path="../conf", config_name="import")
@clear_errors
def _hydra_main(cfg: DictConfig) -> None:
    run(cfg)


def main() -> None:
    """``t2i-import <source> key=value ...``: the first bare word becomes ``source=<word>``."""
    first_word_as("source", __doc__)
    _hydra_main()


if __name__ == "__main__":
    main()
