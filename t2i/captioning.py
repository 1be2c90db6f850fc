"""Image -> text with the transformer's captioning direction: greedy, beam search and sampling, with the KV cache.

A caption is ``text_len`` positions: tokens, then pads. Position ``p`` may hold a vocabulary token or the
pad of position ``p`` (any other pad id is masked out), and the first pad ends the caption: the rest are
pads. Captions come back as tokenizer ids ``[B, text_len]`` padded with the model's ``text_pad_id``, so
``TextTokenizer.decode`` reads them.

``caption(model, codes, method="beam", beam_size=4, length_penalty=1.0)`` ranks beams by their summed
log-probability divided by ``length ** length_penalty`` (length: tokens plus the end), the usual
length-normalised beam search; ``beam_size=1`` is greedy. ``method="sample"`` draws with ``top_k`` /
``top_p`` / ``temperature`` (``temperature=0``: greedy).
"""

from __future__ import annotations

import torch

from t2i.errors import ConfigError
from t2i.sampling import _pick, check_sampling

METHODS = ("greedy", "beam", "sample")


def _allowed(model, position: int, device) -> torch.Tensor:
    """``[text ids]`` bool: the tokens caption position ``position`` may hold (vocabulary + its own pad)."""
    n = model.text_head.out_features
    ok = torch.zeros(n, dtype=torch.bool, device=device)
    ok[:model.text_vocab] = True
    if model.text_pad == "per_position":
        ok[model.text_vocab + position] = True
    return ok


def _is_end(model, ids: torch.Tensor) -> torch.Tensor:
    return (ids >= model.text_vocab) | (ids == model.text_pad_id)


def _to_tokenizer_ids(model, ids: torch.Tensor) -> torch.Tensor:
    """Model ids -> tokenizer ids: everything from the first end on is the pad id."""
    ended = _is_end(model, ids).long().cumsum(1) > 0
    return ids.masked_fill(ended, model.text_pad_id)


class _Stepper:
    """Next-token logits of the captions so far, cached or not, for ``rows`` sequences of the same image codes."""

    def __init__(self, model, codes: torch.Tensor, use_cache: bool):
        self.model, self.codes, self.use_cache = model, codes, use_cache
        self.cache = model.new_cache(codes.shape[0], codes.device) if use_cache else None

    def first(self) -> torch.Tensor:
        return self.model.caption_prefill(self.codes, self.cache) if self.use_cache else \
            self.model.caption_logits_uncached(self.codes, None)

    def next(self, prefix: torch.Tensor) -> torch.Tensor:
        if self.use_cache:
            return self.model.caption_step(prefix[:, -1], prefix.shape[1] - 1, self.cache)
        return self.model.caption_logits_uncached(self.codes, prefix)

    def reorder(self, index: torch.Tensor) -> None:
        self.codes = self.codes.index_select(0, index)
        if self.cache is not None:
            self.cache.reorder(index)


@torch.no_grad()
def caption(model, codes: torch.Tensor, method: str = "beam", beam_size: int = 4, length_penalty: float = 1.0,
            top_k: int | None = None, top_p: float | None = None, temperature: float = 1.0,
            use_cache: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """Captions ``[B, text_len]`` (tokenizer ids) for image codes ``[B, h, w]`` (or ``[B, h*w]``)."""
    if method not in METHODS:
        raise ConfigError(f"caption method={method!r} is unknown; use one of {', '.join(METHODS)}")
    if method == "beam" and (not isinstance(beam_size, int) or beam_size < 1):
        raise ConfigError(f"beam_size={beam_size} must be an integer >= 1")
    if method == "sample":
        check_sampling(1, top_k, top_p, temperature)
    model._need_captioning()
    was_training = model.training
    model.eval()
    codes = codes.to(next(model.parameters()).device).flatten(1).long()
    if codes.shape[1] != model.n_image:
        raise ConfigError(f"image codes have {codes.shape[1]} positions, the model's grid has {model.n_image}")
    if method == "beam":
        out = _beam(model, codes, beam_size, float(length_penalty), use_cache)
    else:
        sample = method == "sample"
        out = _left_to_right(model, codes, use_cache, temperature if sample else 0.0,
                             top_k if sample else None, top_p if sample else None, generator)
    model.train(was_training)
    return _to_tokenizer_ids(model, out)


def _left_to_right(model, codes, use_cache, temperature, top_k, top_p, generator) -> torch.Tensor:
    B, T = codes.shape[0], model.text_len
    step = _Stepper(model, codes, use_cache)
    ids = torch.empty(B, 0, dtype=torch.long, device=codes.device)
    done = torch.zeros(B, dtype=torch.bool, device=codes.device)
    for p in range(T):
        logits = step.first() if p == 0 else step.next(ids)
        logits = logits.float().masked_fill(~_allowed(model, p, codes.device), float("-inf"))
        pick = _pick(logits, temperature, top_k, top_p, generator)
        pad = model.text_vocab + p if model.text_pad == "per_position" else model.text_pad_id
        pick = torch.where(done, torch.full_like(pick, pad), pick)
        done |= _is_end(model, pick)
        ids = torch.cat([ids, pick[:, None]], 1)
    return ids


def _beam(model, codes, K: int, alpha: float, use_cache: bool) -> torch.Tensor:
    """Beam search: each step keeps the ``K`` best open captions; a candidate that ends the caption and ranks
    among the step's ``K`` best is finished (score / length ** alpha); a caption is done once it has ``K``
    finished candidates (so ``K = 1`` is greedy decoding)."""
    B, T, dev = codes.shape[0], model.text_len, codes.device
    step = _Stepper(model, codes.repeat_interleave(K, 0), use_cache)
    ids = torch.empty(B * K, 0, dtype=torch.long, device=dev)
    score = torch.zeros(B, K, device=dev)
    score[:, 1:] = float("-inf")  # the K beams start identical: open one
    finished: list[list[tuple[float, torch.Tensor]]] = [[] for _ in range(B)]
    for p in range(T):
        logits = step.first() if p == 0 else step.next(ids)
        logp = logits.float().masked_fill(~_allowed(model, p, dev), float("-inf")).log_softmax(-1)
        V = logp.shape[-1]
        total = (score.view(-1, 1) + logp).view(B, K * V)
        cand_val, cand_idx = total.topk(2 * K, dim=-1)
        rows, toks, vals = [], [], []
        for b in range(B):
            keep = []
            for rank, (v, i) in enumerate(zip(cand_val[b].tolist(), cand_idx[b].tolist())):
                beam, tok = divmod(i, V)
                ends = bool(_is_end(model, torch.tensor(tok))) or p == T - 1
                if ends:
                    if rank < K and len(finished[b]) < K and v > float("-inf"):
                        seq = torch.cat([ids[b * K + beam], torch.tensor([tok], device=dev)])
                        finished[b].append((v / (p + 1) ** alpha, seq))
                elif len(keep) < K:
                    keep.append((v if len(finished[b]) < K else float("-inf"), b * K + beam, tok))
            while len(keep) < K:  # fewer open candidates than beams: pad with dead ones
                keep.append((float("-inf"), b * K, 0))
            for v, r, t in keep:
                vals.append(v)
                rows.append(r)
                toks.append(t)
        if p == T - 1 or all(len(f) >= K for f in finished):
            break
        rows_t = torch.tensor(rows, device=dev)
        score = torch.tensor(vals, device=dev).view(B, K)
        ids = torch.cat([ids.index_select(0, rows_t), torch.tensor(toks, device=dev)[:, None]], 1)
        step.reorder(rows_t)
    out = torch.full((B, T), model.text_pad_id, dtype=torch.long, device=dev)
    for b in range(B):
        seq = max(finished[b], key=lambda f: f[0])[1]
        out[b, :seq.shape[0]] = seq
    return out
