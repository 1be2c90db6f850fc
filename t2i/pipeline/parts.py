"""What a transformer checkpoint carries, loaded once: the model, its image tokenizer, its text tokenizer
and (for a model with knowledge) the linker of prompt entities; and the prompts encoded for it.

Every check names the argument a user wrote (``ckpt=``, ``image_tokenizer=``, ``text_tokenizer=``), so
``t2i-generate``, ``t2i-caption``, ``t2i-eval`` and :class:`t2i.pipeline.Pipeline` give the same one-line
errors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from t2i.data.tokenizer import TextTokenizer, tokenizer_from_checkpoint
from t2i.errors import ConfigError, T2IError, reason
from t2i.keys import IMAGE_TOKENIZER_KEY

log = logging.getLogger("t2i.pipeline")


def load_checkpoint(path, key: str = "ckpt") -> dict:
    """The transformer checkpoint at ``path`` (ours or a ``t2i-import`` file), read once on the CPU."""
    p = Path(str(path)).expanduser() if path else None
    if p is None or not p.is_file():
        raise ConfigError(f"{key}={path}: no such file (a TransformerModule .ckpt from "
                          "`t2i-train experiment=*_transformer`, or a `t2i-import` file)")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise T2IError(f"{key}={path} cannot be read ({reason(e)})") from None
    model_hp = (ckpt.get("hyper_parameters") or {}).get("model") if isinstance(ckpt, dict) else None
    if "state_dict" not in ckpt or not isinstance(model_hp, dict) or "image_vocab" not in model_hp:
        raise T2IError(f"{key}={path} is not a transformer checkpoint (train one with experiment=*_transformer)")
    return ckpt


def text_tokenizer(ckpt: dict, override=None, where: str = "ckpt") -> TextTokenizer:
    """``override`` (a tokenizer file), else the tokenizer stored in the checkpoint, else its hparams path."""
    if override:
        return override if isinstance(override, TextTokenizer) else TextTokenizer.from_file(override,
                                                                                             key="text_tokenizer")
    tok = tokenizer_from_checkpoint(ckpt)
    if tok is not None:
        return tok
    path = ckpt["hyper_parameters"].get("text_tokenizer")
    if path and Path(path).exists():
        return TextTokenizer.from_file(path, key="text_tokenizer")
    raise T2IError(f"{where} carries no text tokenizer; pass text_tokenizer=<tokenizer.json of its run>")


def image_tokenizer(ckpt: dict, override=None, where: str = "ckpt") -> nn.Module:
    """``override`` (a tokenizer .ckpt, a spec, or a module), else the tokenizer the checkpoint carries,
    else (checkpoints from before it carried one) the one its hyper-parameters name."""
    if isinstance(override, nn.Module):
        return override
    from t2i.pretrained.image_tokenizers import load_tokenizer

    source = override or ckpt.get(IMAGE_TOKENIZER_KEY) or ckpt["hyper_parameters"].get("image_tokenizer")
    if not source:
        raise T2IError(f"{where} carries no image tokenizer; pass image_tokenizer=<stage-1 .ckpt>")
    return load_tokenizer(source, key="image_tokenizer")


@dataclass
class Parts:
    """A transformer checkpoint's pieces; ``linker(prompts) -> (ids, spans)`` links prompt entities for a
    model with knowledge (None without)."""

    model: nn.Module
    image_tokenizer: nn.Module
    text_tokenizer: TextTokenizer
    linker: object | None
    checkpoint: dict

    def __iter__(self):  # model, image_tokenizer, text_tokenizer, linker = parts
        return iter((self.model, self.image_tokenizer, self.text_tokenizer, self.linker))


def parts_for(cfg, device: torch.device) -> Parts:
    """:func:`load_parts` for a command's config (``ckpt``, ``ema``, ``image_tokenizer``, ``text_tokenizer``)."""
    return load_parts(cfg.get("ckpt"), device, bool(cfg.get("ema", True)), cfg.get("image_tokenizer") or None,
                      cfg.get("text_tokenizer") or None)


def load_parts(path, device: torch.device, ema: bool = True, image_tokenizer_override=None,
               text_tokenizer_override=None, key: str = "ckpt", ckpt: dict | None = None) -> Parts:
    """The checkpoint's model (its EMA weights when ``ema`` and it has them), image tokenizer, text tokenizer
    and entity linker on ``device``, in eval mode. The file is read once (``ckpt``: already read)."""
    from t2i.knowledge.prompts import checkpoint_linker
    from t2i.lit.transformer import TransformerModule

    ckpt = ckpt if ckpt is not None else load_checkpoint(path, key)
    module = TransformerModule(**ckpt["hyper_parameters"])
    module.load_state_dict(ckpt["state_dict"])
    model = (module.ema if ema and module.ema is not None else module.model).to(device).eval()
    where = f"{key}={path}"
    image_tok = image_tokenizer(ckpt, image_tokenizer_override, where).to(device).eval()
    if image_tok.codebook_size != model.image_vocab:
        raise T2IError(f"the image tokenizer ({image_tokenizer_override or 'carried by the checkpoint'}) has "
                       f"{image_tok.codebook_size} codes; the transformer was trained on {model.image_vocab}: "
                       f"pass the tokenizer its codes came from (image_tokenizer=)")
    tok = text_tokenizer(ckpt, text_tokenizer_override, where)
    return Parts(model, image_tok, tok, checkpoint_linker(ckpt, model, tok, where=where), ckpt)


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
