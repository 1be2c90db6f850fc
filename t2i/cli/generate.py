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

Settings that cannot work stop the run with one line before any model is loaded: ``top_p`` outside
(0, 1], a negative ``temperature`` (``0`` is greedy), ``top_k``/``num_samples``/``batch_size`` below 1,
an empty prompt. A model with knowledge (ARTIST, ``model.knowledge``) gets each prompt's entities linked
with the entity lexicon its checkpoint carries (:mod:`t2i.knowledge.prompts`). Prompts with pieces the
model's text tokenizer does not know get one warning listing them all; a prompt that is more than half
``[UNK]`` is an error unless ``allow_unk=true``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torchvision.utils import save_image
from tqdm.auto import tqdm

from t2i.cli.common import clear_errors
from t2i.cli.tokenize import pick_device
from t2i.data.tokenizer import TextTokenizer, tokenizer_from_checkpoint
from t2i.errors import ConfigError, T2IError
from t2i.viz import sample_grid

log = logging.getLogger("t2i.generate")
SETTINGS = ("top_k", "top_p", "temperature", "cfg_scale", "use_cache", "ema")


def read_prompts(cfg: DictConfig) -> list[str]:
    prompts = [str(p) for p in (cfg.prompts or [])]
    if cfg.prompts_file:
        path = Path(str(cfg.prompts_file)).expanduser()
        if not path.is_file():
            raise ConfigError(f"prompts_file={cfg.prompts_file}: no such file")
        prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ConfigError("no prompts: pass prompts='[caption one, caption two]' or prompts_file=<one caption a line>")
    for i, p in enumerate(prompts):
        if not p.strip():
            raise ConfigError(f"prompts[{i}] is empty (it would sample without any caption): remove it or write "
                              f"the caption")
    return prompts


def check_settings(cfg: DictConfig) -> None:
    """Reject settings that cannot work before any model is loaded (one ConfigError naming the key)."""
    from t2i.sampling import check_sampling

    for key in ("num_samples", "batch_size"):
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{key}={v} must be an integer >= 1")
    check_sampling(cfg.num_samples, cfg.top_k, cfg.top_p, cfg.temperature, cfg.cfg_scale)
    sr = cfg.get("sr") or {}
    for key in ("tile", "tile_pad"):
        v = sr.get(key, 0)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f"sr.{key}={v} must be an integer >= 0")
    check_rerank(cfg.rerank)
    if sr.get("scale") is not None and sr.get("scale") not in (1, 2, 4, 8):
        raise ConfigError(f"sr.scale={sr.get('scale')} must be 1, 2, 4 or 8 (or null: the weights' own scale)")
    if sr.get("ckpt") and not Path(str(sr.get("ckpt"))).expanduser().is_file():
        raise ConfigError(f"sr.ckpt={sr.get('ckpt')}: no such file (a Real-ESRGAN .pth, e.g. RealESRGAN_x4plus.pth, "
                          f"or a `t2i-import realesrgan` output)")


def check_rerank(rr: DictConfig) -> tuple[bool, bool, str | None]:
    """``(by CLIP, by caption likelihood, combine)`` from the ``rerank`` block; one ConfigError for settings
    that cannot work (checked before any model loads)."""
    from t2i.pipeline.caption_rerank import check_combine

    backend = rr.get("backend", "t2i")
    if backend == "caption":
        if rr.get("combine") not in (None, "null", "none"):
            raise ConfigError(f"rerank.combine={rr.combine} takes its CLIP from rerank.backend/rerank.ckpt: set "
                              f"rerank.backend to the CLIP's kind (t2i, open_clip, cn_clip), not caption")
        if rr.get("ckpt"):
            raise ConfigError(f"rerank.backend=caption ranks by the caption likelihood, but rerank.ckpt={rr.ckpt} "
                              f"is a CLIP: drop rerank.ckpt, or rank by both with rerank.backend=<the CLIP's kind> "
                              f"rerank.combine=rank_sum")
        return False, True, None
    combine = check_combine(rr.get("combine"), bool(rr.get("ckpt")))
    return bool(rr.get("ckpt")), combine is not None, combine


def load_upscaler(sr: DictConfig, device: torch.device):
    """The RRDBNet of ``sr.ckpt`` (None without one); ConfigError for a missing file or an ``sr.scale``
    the weights do not have (Real-ESRGAN trains one model per scale: x8 is its own model, not x4 twice)."""
    if not sr or not sr.get("ckpt"):
        return None
    from t2i.pretrained.realesrgan import load_sr

    model = load_sr(Path(str(sr.ckpt)).expanduser())
    if sr.get("scale") is not None and int(sr.scale) != model.scale:
        raise ConfigError(f"sr.scale={sr.scale}, but sr.ckpt={sr.ckpt} holds x{model.scale} weights (each "
                          f"Real-ESRGAN model has one scale): set sr.scale={model.scale} or null, or pass "
                          f"x{sr.scale} weights")
    return model.to(device)


def load_checkpoint(path) -> dict:
    p = Path(str(path)).expanduser() if path else None
    if p is None or not p.is_file():
        raise ConfigError(f"ckpt={path}: no such file (a TransformerModule .ckpt from "
                          "`t2i-train experiment=*_transformer`)")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise T2IError(f"ckpt={path} cannot be read ({type(e).__name__}: {e})") from None
    model_hp = (ckpt.get("hyper_parameters") or {}).get("model")
    if "state_dict" not in ckpt or not isinstance(model_hp, dict) or "image_vocab" not in model_hp:
        raise T2IError(f"ckpt={path} is not a transformer checkpoint (train one with experiment=*_transformer)")
    return ckpt


def text_tokenizer(cfg: DictConfig, ckpt: dict) -> TextTokenizer:
    """The override, else the tokenizer the datamodule stored in the checkpoint, else the hparams path."""
    if cfg.text_tokenizer:
        return TextTokenizer.from_file(cfg.text_tokenizer, key="text_tokenizer")
    tok = tokenizer_from_checkpoint(ckpt)
    if tok is not None:
        return tok
    path = ckpt["hyper_parameters"].get("text_tokenizer")
    if path and Path(path).exists():
        return TextTokenizer.from_file(path, key="text_tokenizer")
    raise T2IError(f"ckpt={cfg.ckpt} carries no text tokenizer; pass text_tokenizer=<tokenizer.json of its run>")


def check_prompts(tok: TextTokenizer, prompts: list[str], text_len: int, allow_unk: bool = True) -> None:
    """One warning for all prompts with pieces unknown to the text tokenizer (mapped to [UNK]) and one
    for all prompts longer than ``text_len``; a ConfigError for a prompt that encodes to no token, or
    (unless ``allow_unk``) one whose tokens are more than half [UNK] - the model would not see its caption."""
    lengths = tok.lengths(prompts)
    unknown, long = [], []
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        if n == 0:
            raise ConfigError(f"prompts[{i}]={p!r} encodes to no token (it would sample without any caption): "
                              f"remove it or write the caption")
        unk = tok.unknown(p)
        if unk:
            if not allow_unk and 2 * len(unk) > n:
                raise ConfigError(
                    f"prompts[{i}]={p!r}: {len(unk)} of its {n} tokens are unknown to the model's text tokenizer "
                    f"({', '.join(map(repr, unk[:5]))}): write it in the model's language/vocabulary, or pass "
                    f"allow_unk=true to sample anyway")
            unknown.append(f"{i} ({', '.join(map(repr, unk[:3]))}{', ...' if len(unk) > 3 else ''})")
        if n > text_len:
            long.append(f"{i} ({n})")
    if unknown:
        log.warning("%d of %d prompt(s) have pieces unknown to the text tokenizer, read as [UNK]: prompt %s",
                    len(unknown), len(prompts), "; ".join(unknown[:10]) + ("; ..." if len(unknown) > 10 else ""))
    if long:
        log.warning("%d prompt(s) have more tokens than the model reads (text_len=%d), the rest is cut: prompt %s",
                    len(long), text_len, ", ".join(long[:10]) + (", ..." if len(long) > 10 else ""))


def encode_prompts(tok: TextTokenizer, prompts: list[str], text_len: int, allow_unk: bool = True) -> torch.Tensor:
    """``[len(prompts), text_len]`` ids after :func:`check_prompts` (one summary warning per call)."""
    check_prompts(tok, prompts, text_len, allow_unk)
    return tok.encode(prompts, text_len)


def build(cfg: DictConfig, device: torch.device):
    """``(model, image tokenizer, text tokenizer, linker)``; ``linker(prompts) -> (ids, spans)`` links the
    prompts' entities for a model with knowledge (None without)."""
    from t2i.knowledge.prompts import checkpoint_linker
    from t2i.lit.transformer import TransformerModule

    ckpt = load_checkpoint(cfg.ckpt)  # read once: the module is rebuilt from it, not from the file again
    module = TransformerModule(**ckpt["hyper_parameters"])
    module.load_state_dict(ckpt["state_dict"])
    model = (module.ema if cfg.ema and module.ema is not None else module.model).to(device).eval()
    image_tok = image_tokenizer(cfg, ckpt).to(device)
    if image_tok.codebook_size != model.image_vocab:
        raise T2IError(f"the image tokenizer ({cfg.image_tokenizer or 'carried by the checkpoint'}) has "
                       f"{image_tok.codebook_size} codes; the transformer was trained on {model.image_vocab}: "
                       f"pass the tokenizer its codes came from (image_tokenizer=)")
    tok = text_tokenizer(cfg, ckpt)
    return model, image_tok, tok, checkpoint_linker(ckpt, model, tok, where=f"ckpt={cfg.ckpt}")


def image_tokenizer(cfg: DictConfig, ckpt: dict):
    """The override (a tokenizer .ckpt or a spec, see :func:`t2i.pretrained.load_tokenizer`), else the tokenizer
    the transformer checkpoint carries, else (checkpoints from before it carried one) the one its
    hyper-parameters name."""
    from t2i.keys import IMAGE_TOKENIZER_KEY
    from t2i.pretrained.image_tokenizers import load_tokenizer

    source = cfg.image_tokenizer or ckpt.get(IMAGE_TOKENIZER_KEY) or ckpt["hyper_parameters"].get("image_tokenizer")
    if not source:
        raise T2IError(f"ckpt={cfg.ckpt} carries no image tokenizer; pass image_tokenizer=<stage-1 .ckpt>")
    return load_tokenizer(source, key="image_tokenizer")


def run(cfg: DictConfig) -> dict:
    from t2i.sampling import decode_codes, generate

    check_settings(cfg)
    prompts = read_prompts(cfg)
    device = pick_device(str(cfg.device))
    model, image_tok, tok, link = build(cfg, device)
    text = encode_prompts(tok, prompts, model.text_len, allow_unk=bool(cfg.get("allow_unk", False)))
    by_clip, by_caption, combine = check_rerank(cfg.rerank)
    from t2i.pipeline.caption_rerank import caption_scores, check_captioning, rank_candidates

    if by_caption:
        check_captioning(model, f"ckpt={cfg.ckpt}")
    clip = None
    if by_clip:  # loaded once the prompts are known to be usable
        from t2i.pipeline.rerank import load_reranker

        clip = load_reranker(cfg.rerank.ckpt, cfg.rerank.backend, cfg.rerank.get("model_name")).to(device)
    upscaler = load_upscaler(cfg.get("sr"), device)
    sr_info = None if upscaler is None else {"file": str(cfg.sr.ckpt), "scale": upscaler.scale}
    out = Path(str(cfg.output)).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: cfg[k] for k in SETTINGS}
    per_batch = max(1, int(cfg.batch_size) // int(cfg.num_samples))
    t0, rows = time.perf_counter(), []
    bar = tqdm(total=len(prompts), desc="prompts", disable=not cfg.progress)
    for start in range(0, len(prompts), per_batch):
        idx = list(range(start, min(start + per_batch, len(prompts))))
        gen = torch.Generator(device=device).manual_seed(int(cfg.seed) + start)
        entities = link([prompts[i] for i in idx]) if link is not None else None
        codes = generate(model, text[idx[0]:idx[-1] + 1], int(cfg.num_samples), top_k=cfg.top_k, top_p=cfg.top_p,
                         temperature=float(cfg.temperature), cfg_scale=cfg.cfg_scale, use_cache=bool(cfg.use_cache),
                         generator=gen, entities=entities)
        cap = None
        if by_caption:  # on the codes, before any decoding
            cap = caption_scores(model, codes, text[idx[0]:idx[-1] + 1].repeat_interleave(int(cfg.num_samples), 0))
            cap = cap.cpu().view(len(idx), -1)
        images = decode_codes(image_tok, codes)
        for n, i in enumerate(idx):
            chunk = images[n * int(cfg.num_samples):(n + 1) * int(cfg.num_samples)]
            order, scores = list(range(len(chunk))), [None] * len(chunk)
            clip_s, cap_s, comb_s = [None] * len(chunk), [None] * len(chunk), [None] * len(chunk)
            if clip is not None or cap is not None:  # best first; keep rerank.top of them
                from t2i.pipeline.rerank import score as clip_score

                cs = clip_score(clip, chunk, prompts[i]) if clip is not None else None
                ranked, combined = rank_candidates(cs, None if cap is None else cap[n], combine)
                ranked = ranked[:cfg.rerank.top] if cfg.rerank.top is not None else ranked
                order = ranked.tolist()
                clip_s = cs[ranked].tolist() if cs is not None else clip_s
                cap_s = cap[n][ranked].tolist() if cap is not None else cap_s
                comb_s = combined[ranked].tolist() if combined is not None else comb_s
                scores = comb_s if combine else clip_s if clip is not None else cap_s
            pics = (chunk[order].float().clamp(-1, 1) + 1) / 2
            if upscaler is not None:  # RRDBNet works in [0, 1]
                from t2i.models.rrdbnet import upscale

                pics = torch.cat([upscale(upscaler, p[None], tile=int(cfg.sr.tile), tile_pad=int(cfg.sr.tile_pad))
                                  for p in pics]).float().clamp(0, 1)  # one image at a time: bounded memory
            for j, (img, src, sc, c1, c2, c3) in enumerate(zip(pics, order, scores, clip_s, cap_s, comb_s)):
                name = f"p{i:03d}_s{j:02d}.png"
                save_image(img, out / name)
                rows.append({"prompt": prompts[i], "prompt_index": i, "sample": j, "drawn": src,
                             "seed": int(cfg.seed) + start, "file": name, "settings": settings,
                             "score": sc, "reranked": clip is not None or cap is not None, "sr": sr_info,
                             "clip_score": c1, "caption_score": c2, "combined": c3,
                             "rerank": None if clip is None and cap is None else combine or
                             ("caption" if cap is not None else "clip")})
            grid = sample_grid(pics, nrow=min(8, len(pics)), marked=[0] if clip is not None or cap is not None else [])
            save_image(grid, out / f"grid_p{i:03d}.png")
            bar.update(1)
    bar.close()
    seconds = time.perf_counter() - t0
    with open(out / "samples.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    n_tokens = len(rows) * model.n_image
    print(f"generated {len(rows)} images for {len(prompts)} prompt(s) in {seconds:.1f} s "
          f"({n_tokens / seconds:.0f} image tokens/s) on {device}; output in {out}")
    return {"output": str(out), "count": len(rows), "seconds": seconds, "tokens_per_s": n_tokens / seconds}


@hydra.main(version_base="1.3", config_path="../conf", config_name="generate")
@clear_errors
def main(cfg: DictConfig) -> None:
    OmegaConf.resolve(cfg)
    run(cfg)


if __name__ == "__main__":
    main()
