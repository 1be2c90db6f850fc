"""Sampling image codes from a :class:`t2i.models.transformer.Transformer`.

:func:`generate` draws ``num_samples`` code grids per caption with temperature, top-k, top-p and
classifier-free guidance. Guidance runs a second, unconditional branch (every text token the pad) in
the same batch, each branch with its own rows of the KV cache, and mixes the logits as
``cond + (cfg_scale - 1) * (cond - uncond)`` (so ``cfg_scale = 1`` draws exactly what ``cfg_scale = None``, no guidance, draws).
With ``use_cache=False`` every step reruns the whole sequence; for the same ``generator`` seed both
paths draw the same codes. ``prime`` keeps the first image codes of a given grid (image priming) and
samples the rest.
"""

from __future__ import annotations

import itertools
import math
from numbers import Integral, Real

import torch
from tqdm.auto import tqdm

from t2i.errors import ConfigError
from t2i.models import rows

# The one default top_k of t2i-generate, t2i-eval (sample.top_k) and Pipeline: None samples the model's own
# distribution, every code. Both configs write it out (a test holds them to this); metrics.json and
# samples.jsonl record the value a run used. The Shapes demo sets top_k=3 (see conf/demo.yaml).
DEFAULT_TOP_K = None


def check_sampling(num_samples=1, top_k=None, top_p=None, temperature=1.0, cfg_scale=None, prefix: str = "") -> None:
    """Raise one :class:`ConfigError` naming the first sampling setting that cannot work.

    ``prefix`` is prepended to the key in the message (``"sample."`` for ``t2i-eval``'s keys).
    ``temperature=0`` is allowed and means greedy (always the most likely code); ``top_k``/``top_p``
    ``None`` mean no filtering; ``top_p=1`` keeps every token.
    """
    def bad(key, value, rule):
        raise ConfigError(f"{prefix}{key}={value} {rule}")

    def number(key, value):
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            bad(key, value, "must be a finite number")
        return float(value)

    if isinstance(num_samples, bool) or not isinstance(num_samples, Integral) or num_samples < 1:
        bad("num_samples", num_samples, "must be an integer >= 1")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, Integral) or top_k < 1):
        bad("top_k", top_k, "must be an integer >= 1 (null: no top-k filtering)")
    if top_p is not None and not 0 < number("top_p", top_p) <= 1:
        bad("top_p", top_p, "must be in (0, 1] (1 keeps every token; null: no top-p filtering)")
    if number("temperature", temperature) < 0:
        bad("temperature", temperature, "must be >= 0 (0 is greedy: always the most likely code; 1 samples "
                                         "the model's distribution)")
    if cfg_scale is not None:
        number("cfg_scale", cfg_scale)


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the ``top_k`` largest and outside the smallest set whose
    probability reaches ``top_p`` (the most likely token always stays)."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        fast = rows.top_k_filter(logits, top_k)  # the same values, faster (None: not a case it takes)
        if fast is not None:
            logits = fast
        else:
            kth = logits.topk(top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # mass before this token already reaches top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def _pick(logits: torch.Tensor, temperature: float, top_k, top_p, generator) -> torch.Tensor:
    logits = logits.float()
    if temperature == 0:  # greedy
        return logits.argmax(-1)
    if temperature != 1:  # x / 1 is x: skip the pass over every code's logit
        logits = logits / temperature
    probs = filter_logits(logits, top_k, top_p).softmax(-1)
    return rows.multinomial(probs, generator).squeeze(-1)  # torch.multinomial's draw, faster (see rows.py)


def _guide(logits: torch.Tensor, batch: int, cfg_scale: float) -> torch.Tensor:
    if logits.shape[0] == batch:
        return logits
    cond, uncond = logits[:batch].float(), logits[batch:].float()
    return cond + (cfg_scale - 1.0) * (cond - uncond)


@torch.no_grad()
def generate(model, text_ids: torch.Tensor, num_samples: int = 1, top_k: int | None = None,
             top_p: float | None = None, temperature: float = 1.0, cfg_scale: float | None = None, use_cache: bool = True,
             generator: torch.Generator | None = None, prime: torch.Tensor | None = None,
             progress: bool = False, entities=None) -> torch.Tensor:
    """Sample codes ``[B * num_samples, h, w]`` for captions ``text_ids [B, text_len]`` (tokenizer ids);
    the samples of caption ``b`` are rows ``b * num_samples .. (b + 1) * num_samples - 1``.

    ``cfg_scale`` (a number, 1 included) turns on classifier-free guidance with an unconditional
    branch; ``None`` samples conditionally only (the model should be trained with ``cond_drop_prob > 0``
    for guidance to help). ``prime [B, n]`` (or ``[B, h, w]``, the first ``n`` codes kept) primes
    every sample of a caption with the first ``n`` image codes. ``entities``: the captions' linked
    entities ``(ids [B, E], spans [B, E, 2])`` for a model with knowledge (the null caption has none).

    Settings that cannot work (``top_p`` outside (0, 1], a negative ``temperature``, ``top_k < 1``,
    ``num_samples < 1``, ids outside the text vocabulary or a ``text_len`` the model does not read)
    raise :class:`~t2i.errors.ConfigError` naming the argument; ``temperature=0`` is greedy.
    """
    check_sampling(num_samples, top_k, top_p, temperature, cfg_scale)
    if text_ids.dim() != 2 or text_ids.shape[1] != model.text_len:
        raise ConfigError(f"text_ids has shape {list(text_ids.shape)}; the model reads [batch, {model.text_len}] "
                          f"(encode the captions with text_len={model.text_len})")
    if text_ids.is_floating_point() or text_ids.is_complex():
        raise ConfigError(f"text_ids has dtype {text_ids.dtype}; pass integer token ids")
    if text_ids.numel() and (int(text_ids.min()) < 0 or int(text_ids.max()) >= model.text_vocab):
        raise ConfigError(f"text_ids holds ids outside [0, {model.text_vocab}) (the model's text vocabulary): "
                          f"encode the captions with the tokenizer the model was trained with")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    text = text_ids.to(device).repeat_interleave(num_samples, dim=0)
    batch = text.shape[0]
    guided = cfg_scale is not None
    if entities is not None:
        entities = tuple(t.to(device).repeat_interleave(num_samples, dim=0) for t in entities)
    if guided:
        null = torch.full_like(text, model.text_pad_id)
        text = torch.cat([text, null])
        if entities is not None:
            entities = (torch.cat([entities[0], torch.full_like(entities[0], -1)]), torch.cat([entities[1]] * 2))
    codes = torch.zeros(batch, model.n_image, dtype=torch.long, device=device)
    n_prime = 0
    if prime is not None:
        prime = prime.to(device).flatten(1).long().repeat_interleave(num_samples, dim=0)
        n_prime = prime.shape[1]
        if n_prime >= model.n_image:
            raise ValueError(f"prime has {n_prime} codes; the grid has only {model.n_image}")
        codes[:, :n_prime] = prime
    both = (lambda c: torch.cat([c, c])) if guided else (lambda c: c)

    cache = model.new_cache(text.shape[0], device) if use_cache else None
    steps = tqdm(range(n_prime, model.n_image), desc="sampling", disable=not progress, leave=False)
    for i in steps:
        if not use_cache:
            logits = model.image_logits_uncached(text, both(codes[:, :i]), entities)
        elif i == n_prime:
            logits = model.prefill(text, cache, both(codes[:, :i]) if i else None, entities)
        else:
            logits = model.decode_step(both(codes[:, i - 1]), i - 1, cache)
        codes[:, i] = _pick(_guide(logits, batch, cfg_scale), temperature, top_k, top_p, generator)
    model.train(was_training)
    return codes.view(batch, *model.grid)


@torch.no_grad()
def decode_codes(tokenizer, codes: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Images ``[N, 3, H, W]`` in ``[-1, 1]`` from code grids with an image tokenizer (batched)."""
    tensor = next(itertools.chain(tokenizer.parameters(), tokenizer.buffers()), None)
    device = tensor.device if tensor is not None else codes.device
    return torch.cat([tokenizer.decode(codes[i:i + batch_size].to(device)).cpu()
                      for i in range(0, codes.shape[0], batch_size)])
