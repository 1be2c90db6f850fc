"""t2i-generate: captions -> sampled code grids -> images, with the transformer checkpoint's own tokenizers.

    t2i-generate ckpt=<run>/checkpoints/best.ckpt prompts='["一个大的红色圆形在左上角"]' num_samples=8
    t2i-generate ckpt=... prompts_file=captions.txt num_samples=16 top_k=64 cfg_scale=3 output=samples/

Output (``output``, default the Hydra run folder): ``p{prompt:03d}_s{sample:02d}.png`` per sample,
``grid_p{prompt:03d}.png`` per prompt (small images upscaled to cells of at least 128 px, nearest; the
reranked pick, ``s00``, in a red frame) and ``samples.jsonl`` (one line per sample: prompt, index, seed,
file, sampling settings, CLIP score). With ``rerank.ckpt`` (a ``t2i-train experiment=*_clip``
checkpoint) the ``num_samples`` candidates of a prompt are scored by CLIP and written best first
(``s00`` is the chosen one; ``drawn`` is its position among the candidates); ``rerank.top`` keeps
only the best ones. ``rerank.backend=caption`` ranks them instead by the mean log-likelihood of the
prompt given each candidate's codes under the transformer itself (a checkpoint trained with
``model.model.captioning=true``; no CLIP, no decode); ``rerank.combine=rank_sum|zsum`` with a CLIP ranks
by both (:mod:`t2i.pipeline.caption_rerank`); each sample's ``clip_score`` / ``caption_score`` are recorded. With ``sr.ckpt`` (a Real-ESRGAN ``.pth`` or a ``t2i-import realesrgan`` file) every
kept image is upscaled by the RRDBNet after reranking, before it is written (``sr.scale``: must be the
weights' own scale, x2 / x4 / x8 are separate models; ``sr.tile`` > 0 runs tiles of that many pixels with
``sr.tile_pad`` context each). Prompts are sampled ``batch_size // num_samples`` at a time, each
batch from a generator seeded with ``seed + index of its first prompt`` (recorded per sample): the
same command gives the same images; another ``batch_size`` gives other (equally valid) samples.

This command is :class:`t2i.pipeline.Pipeline` behind a config: it checks the config, reads the prompts,
builds the pipeline once, calls it and writes what it returns (:meth:`Generation.save`). ``prompts`` is a
caption or a list of captions (a string is one prompt); ``prompts_file`` a UTF-8 text file, one caption a
line. Settings that cannot work stop the run with one line before any model is loaded: ``top_p`` outside
(0, 1], a negative ``temperature`` (``0`` is greedy), ``top_k``/``num_samples``/``batch_size`` below 1,
an empty prompt, a prompts file that is not UTF-8 text or holds no caption, an ``output`` that is a file. A model with knowledge (ARTIST, ``model.knowledge``) gets each prompt's entities linked
with the entity lexicon its checkpoint carries (:mod:`t2i.knowledge.prompts`). Prompts with pieces the
model's text tokenizer does not know get one warning listing them all; a prompt that is more than half
``[UNK]`` is an error unless ``allow_unk=true``.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

from t2i import checks
from t2i.checks import check_keys
from t2i.cli.common import clear_errors
from t2i.data.prompts import check_output_folder
from t2i.data.prompts import read_prompts as _read_prompts
from t2i.pipeline.parts import check_prompts, encode_prompts, parts_for

__all__ = ["build", "check_prompts", "check_settings", "encode_prompts", "main", "read_prompts", "run"]
log = logging.getLogger("t2i.generate")


def read_prompts(cfg: DictConfig) -> list[str]:
    """``prompts`` (a caption, or a list of them) and the lines of ``prompts_file``."""
    prompts = cfg.prompts
    if isinstance(prompts, ListConfig):
        prompts = OmegaConf.to_container(prompts)
    return _read_prompts(prompts, cfg.prompts_file)


# typed keys the checks of Pipeline / the upscaler / the reranker do not see
KEYS = {
    "allow_unk": checks.boolean(), "use_cache": checks.boolean(), "ema": checks.boolean(),
    "progress": checks.boolean(), "seed": checks.integer(), "output": checks.output_folder(),
    "rerank.model_name": checks.text(optional=True),
    "dtype": checks.choice("bf16", "fp16", "auto", "fp32", optional=True),
    "decode_dtype": checks.choice("bf16", "fp16", "auto", "fp32", optional=True),
}


def check_settings(cfg: DictConfig) -> None:
    """Reject settings that cannot work before any model is loaded (one ConfigError naming the key)."""
    from t2i.pipeline import Pipeline
    from t2i.pipeline.rerank import Reranking
    from t2i.pipeline.upscale import check_upscale

    check_keys(cfg, KEYS)
    Pipeline.check(cfg.num_samples, cfg.batch_size, cfg.top_k, cfg.top_p, cfg.temperature, cfg.cfg_scale,
                   cfg.rerank.get("top"))
    sr = cfg.get("sr") or {}
    check_upscale(sr.get("ckpt"), sr.get("scale"), sr.get("tile", 0), sr.get("tile_pad", 10))
    Reranking.check(*reranker(cfg.rerank))


def reranker(rr: DictConfig) -> tuple:
    """``(reranker, backend, combine)`` for :class:`Pipeline` from the ``rerank`` block."""
    backend = rr.get("backend", "t2i")
    combine = rr.get("combine")
    return rr.get("ckpt") or None, backend, None if combine in ("null", "none") else combine


def build(cfg: DictConfig, device):
    """``(model, image tokenizer, text tokenizer, linker)`` of ``cfg.ckpt`` (see :func:`t2i.pipeline.parts.load_parts`)."""
    return tuple(parts_for(cfg, device))


def run(cfg: DictConfig) -> dict:
    from t2i.pipeline import Pipeline

    check_settings(cfg)
    prompts = read_prompts(cfg)
    out_dir = check_output_folder(cfg.output)
    ckpt, backend, combine = reranker(cfg.rerank)
    sr = cfg.get("sr") or {}
    pipe = Pipeline.from_checkpoint(
        cfg.ckpt, reranker=ckpt if backend != "caption" else "caption", reranker_backend=backend,
        reranker_model_name=cfg.rerank.get("model_name"), combine=combine, upscaler=sr.get("ckpt") or None,
        upscale_scale=sr.get("scale"), upscale_tile=int(sr.get("tile", 0)), upscale_tile_pad=int(sr.get("tile_pad", 10)),
        image_tokenizer=cfg.image_tokenizer or None, text_tokenizer=cfg.text_tokenizer or None,
        device=str(cfg.device), ema=bool(cfg.ema), dtype=cfg.get("dtype"),
        decode_dtype=cfg.get("decode_dtype"))
    result = pipe(prompts, int(cfg.num_samples), top_k=cfg.top_k, top_p=cfg.top_p, temperature=float(cfg.temperature),
                  cfg_scale=cfg.cfg_scale, seed=int(cfg.seed), batch_size=int(cfg.batch_size),
                  top=cfg.rerank.get("top"), use_cache=bool(cfg.use_cache), allow_unk=bool(cfg.get("allow_unk", False)),
                  progress=bool(cfg.progress))
    result.save(out_dir)
    count, seconds = len(result.records), max(result.seconds, 1e-9)
    n_tokens = count * pipe.model.n_image
    print(f"generated {count} images for {len(prompts)} prompt(s) in {seconds:.1f} s "
          f"({n_tokens / seconds:.0f} image tokens/s) on {pipe.device}; output in {out_dir}")
    return {"output": str(out_dir), "count": count, "seconds": seconds, "tokens_per_s": n_tokens / seconds}


@hydra.main(version_base="1.3", config_path="../conf", config_name="generate")
@clear_errors
def main(cfg: DictConfig) -> None:
    OmegaConf.resolve(cfg)
    run(cfg)


if __name__ == "__main__":
    main()
