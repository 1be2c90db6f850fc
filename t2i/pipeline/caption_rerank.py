"""Caption-likelihood reranking (CogView's self-reranking) and its combination with CLIP.

A candidate image is scored by the mean log-probability of its prompt given the candidate's image CODES
(:meth:`t2i.models.transformer.Transformer.caption_logprob`), computed by the sampling transformer itself
(the EMA weights when those sample): nothing is decoded, no CLIP is needed. Higher is better.

``combine`` mixes the CLIP scores and the caption scores of one prompt's candidates:

* ``rank_sum``: each candidate's rank under CLIP plus its rank under the caption likelihood (0 = best);
  the smallest sum wins, ties go to the better CLIP rank. The recorded ``combined`` value is the rank sum
  (lower is better).
* ``zsum``: the sum of the two per-prompt z-scores (``(s - mean) / std`` over the prompt's candidates,
  population std, 0 when all are equal); the largest wins, ties go to the better CLIP rank.

Everything works on ``[B, n]`` score tables (``B`` prompts, ``n`` candidates each).
"""

from __future__ import annotations

import torch

from t2i.errors import ConfigError

COMBINE = ("rank_sum", "zsum")


def check_combine(combine, has_clip: bool, prefix: str = "rerank.", clip_keys: str = "rerank.ckpt") -> str | None:
    """``combine`` normalised (None for none); ConfigError for an unknown one or one without a CLIP."""
    if combine in (None, False, "", "null", "none"):
        return None
    if combine not in COMBINE:
        raise ConfigError(f"{prefix}combine={combine!r} is unknown: use one of {list(COMBINE)} (or null: one scorer)")
    if not has_clip:
        raise ConfigError(f"{prefix}combine={combine} mixes CLIP with the caption likelihood but there is no CLIP: "
                          f"pass {clip_keys}=<a CLIP checkpoint> (or drop {prefix}combine and rank by one scorer)")
    return combine


def check_captioning(model, where: str) -> None:
    """ConfigError unless ``model`` can score captions given image codes."""
    if not getattr(model, "captioning", False) or getattr(model, "text_head", None) is None:
        raise ConfigError(f"{where} has no image -> text direction, which caption-likelihood reranking needs: use a "
                          f"checkpoint trained with model.model.captioning=true (e.g. experiment=shapes_bidirectional), "
                          f"or rerank with a CLIP")


@torch.no_grad()
def caption_scores(model, codes: torch.Tensor, text: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """``[N]`` float32 scores (on the codes' device): ``model.caption_logprob`` of each caption ``text [N, T]``
    (tokenizer ids) given image codes ``codes [N, h, w]``, in chunks of ``batch_size``."""
    if len(codes) != len(text):
        raise ValueError(f"caption_scores: {len(codes)} code grids but {len(text)} captions")
    text = text.to(codes.device)
    out = [model.caption_logprob(codes[i:i + batch_size], text[i:i + batch_size]).float()
           for i in range(0, len(codes), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, device=codes.device)


def ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank of each candidate along the last dimension, 0 = the highest score (equal scores: the
    earlier candidate first)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return order.argsort(dim=-1)


def zscores(scores: torch.Tensor) -> torch.Tensor:
    """Per-row ``(s - mean) / std`` (population std; rows of equal scores give 0)."""
    s = scores.double()
    std = s.std(dim=-1, unbiased=False, keepdim=True)
    z = (s - s.mean(dim=-1, keepdim=True)) / std.clamp_min(1e-12)
    return torch.where(std > 0, z, torch.zeros_like(z))


def rank_candidates(clip: torch.Tensor | None = None, caption: torch.Tensor | None = None,
                    combine: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(order, combined)`` for score tables ``[B, n]``: ``order [B, n]`` candidate indices best first;
    ``combined`` the combination's value per candidate (None without ``combine``). One table alone ranks
    by itself (highest first); with both, ``combine`` decides (see the module docstring)."""
    if combine is None:
        s = clip if clip is not None else caption
        if s is None:
            raise ValueError("rank_candidates needs CLIP or caption scores")
        return torch.sort(s, dim=-1, descending=True, stable=True).indices, None
    if clip is None or caption is None:
        raise ValueError(f"combine={combine} needs both CLIP and caption scores")
    clip_rank = ranks(clip)
    n = clip.shape[-1]
    if combine == "rank_sum":
        combined = clip_rank + ranks(caption)
        key = combined * n + clip_rank  # smallest first: the rank sum, then CLIP's rank
        return key.argsort(dim=-1), combined
    if combine == "zsum":
        combined = zscores(clip) + zscores(caption)
        order = torch.sort(clip_rank, dim=-1).indices  # CLIP's order, then a stable sort by the z sum
        by_z = torch.sort(combined.gather(-1, order), dim=-1, descending=True, stable=True).indices
        return order.gather(-1, by_z), combined.float()
    raise ConfigError(f"combine={combine!r} is unknown: use one of {list(COMBINE)}")


# -- evaluation records: every candidate's scores, and (Shapes) which ranking picks a right image ------------
def oracle_hits(candidates: torch.Tensor, specs) -> list[list[bool]]:
    """``[B][n]``: whether the Shapes oracle reads every attribute of ``specs[b]`` in candidate ``(b, j)``
    (``candidates [B, n, 3, H, W]`` in [-1, 1])."""
    from t2i.data.oracle import score
    from t2i.metrics.scores import to_uint8

    pics = to_uint8(candidates.flatten(0, 1).float()).permute(0, 2, 3, 1).cpu().numpy()
    n = candidates.shape[1]
    return [[score(pics[b * n + j][None], [spec])["all"] == 1.0 for j in range(n)] for b, spec in enumerate(specs)]


def candidate_rows(start: int, captions: list[str], drawn, right=None) -> list[dict]:
    """One record per caption of a drawn batch: its index, the chosen candidate, every candidate's CLIP
    score, caption log-likelihood and combined value (None where not computed) and, with ``right``
    (:func:`oracle_hits`), whether the oracle reads each candidate right."""
    def table(t):
        return None if t is None else t.float().cpu().tolist()

    clip, cap, comb = table(drawn.scores), table(drawn.caption_scores), table(drawn.combined)
    return [{"index": start + i, "caption": c, "chosen": int(drawn.chosen[i]),
             "clip": None if clip is None else clip[i], "caption_ll": None if cap is None else cap[i],
             "combined": None if comb is None else comb[i], "right": None if right is None else right[i]}
            for i, c in enumerate(captions)]


def accuracy_by_ranking(rows: list[dict]) -> dict:
    """Oracle accuracy of the candidate each ranking puts first, over ``rows`` (:func:`candidate_rows` with
    ``right``): ``first`` (no rerank), ``clip``, ``caption``, ``rank_sum`` and ``zsum`` (those the scores
    allow), ``chosen`` (what the run picked) and ``best_of_n`` (the ceiling: any candidate right); plus ``n``."""
    rows = [r for r in rows if r.get("right") is not None]
    if not rows:
        return {}
    right = torch.tensor([r["right"] for r in rows], dtype=torch.float64)
    rows_idx = torch.arange(len(rows))
    out = {"first": float(right[:, 0].mean()), "chosen": float(right[rows_idx, [r["chosen"] for r in rows]].mean())}
    clip = torch.tensor([r["clip"] for r in rows]) if rows[0]["clip"] is not None else None
    cap = torch.tensor([r["caption_ll"] for r in rows]) if rows[0]["caption_ll"] is not None else None
    if clip is not None:
        out["clip"] = float(right[rows_idx, rank_candidates(clip)[0][:, 0]].mean())
    if cap is not None:
        out["caption"] = float(right[rows_idx, rank_candidates(None, cap)[0][:, 0]].mean())
    if clip is not None and cap is not None:
        for how in COMBINE:
            out[how] = float(right[rows_idx, rank_candidates(clip, cap, how)[0][:, 0]].mean())
    out["best_of_n"] = float(right.max(1).values.mean())
    out["n"] = len(rows)
    return out
