"""Knowledge fusion (ARTIST): entity vectors from a knowledge graph mixed into the caption's text states.

A caption comes with up to ``E`` linked entities: ids ``[B, E]`` into the entity table (-1: no entity)
and token spans ``[B, E, 2]`` (``[start, end)`` in text positions). Two ways to use them:

- ``fusion="input"`` (the ARTIST paper's description, our default): at the input, each text position
  attends (scaled dot product, its embedding as the query) over the projected vectors of the entities
  that cover it; the mix is added to its embedding through ``tanh(gate)``, a learned scalar that starts
  at 0. Every layer and every image position then sees the knowledge, and a model whose gate is still
  closed computes exactly what the same model without knowledge computes.
- ``fusion="easynlp"`` (EasyNLP's released code, for loading and comparing ARTIST weights): after the
  last block, one weight per entity -- the dot product of all text states with the entity's projected
  vector map (the projection's bias where the entity is absent), softmaxed over the caption's
  entities -- and the weighted maps are added to the text states. Through the causal mask this
  reaches the logits of the first image token only. Unlike the released code, padded entity slots
  take no weight (there, id 0 pads and is also a real entity).

The entity table is frozen (a buffer) unless ``trainable``.
"""

from __future__ import annotations

import torch
from torch import nn

from t2i.errors import ConfigError

FUSIONS = ("input", "easynlp")


class KnowledgeFusion(nn.Module):
    def __init__(self, num_entities: int, dim: int, d_model: int, trainable: bool = False, fusion: str = "input"):
        super().__init__()
        if fusion not in FUSIONS:
            raise ConfigError(f"model.knowledge.fusion={fusion!r} is unknown; use one of {', '.join(FUSIONS)}")
        if num_entities < 1 or dim < 1:
            raise ConfigError(f"knowledge: {num_entities} entities of dimension {dim}; need at least one of each")
        self.fusion, self.trainable = fusion, trainable
        table = torch.zeros(num_entities, dim)
        if trainable:
            self.table = nn.Parameter(table)
        else:
            self.register_buffer("table", table)
        self.proj = nn.Linear(dim, d_model)
        self.gate = nn.Parameter(torch.zeros(())) if fusion == "input" else None

    def vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids [B, E]`` -> projected vectors ``[B, E, d]`` and the valid mask ``[B, E]``."""
        if ids.numel() and int(ids.max()) >= self.table.shape[0]:
            raise ConfigError(f"entity id {int(ids.max())} is outside the entity table ({self.table.shape[0]} rows): "
                              "link captions with the lexicon the model was trained with")
        valid = ids >= 0
        return self.proj(self.table[ids.clamp(min=0)].to(self.proj.weight.dtype)), valid

    @staticmethod
    def cover(spans: torch.Tensor, valid: torch.Tensor, length: int) -> torch.Tensor:
        """``[B, T, E]`` bool: text position ``t`` lies in entity ``e``'s span."""
        t = torch.arange(length, device=spans.device)[None, :, None]
        return (t >= spans[:, None, :, 0]) & (t < spans[:, None, :, 1]) & valid[:, None, :]

    def forward(self, x: torch.Tensor, ids: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
        """``x [B, T, d]``: the text positions' states (embeddings for ``input``, last-block states for
        ``easynlp``) -> the same with the knowledge added."""
        e, valid = self.vectors(ids)
        cover = self.cover(spans, valid, x.shape[1])
        if self.fusion == "input":
            scores = (x @ e.transpose(1, 2)).float() * x.shape[-1] ** -0.5
            scores = scores.masked_fill(~cover, float("-inf"))
            att = torch.nan_to_num(scores.softmax(-1), nan=0.0)  # uncovered positions: no entity, no change
            return x + torch.tanh(self.gate).to(x.dtype) * (att.to(x.dtype) @ e)
        # easynlp: per-entity maps P[b, e, t] = proj(v_e) where covered, else proj.bias
        maps = torch.where(cover.transpose(1, 2)[..., None], e[:, :, None, :], self.proj.bias)  # [B, E, T, d]
        weights = torch.einsum("btd,betd->be", x.float(), maps.float()).masked_fill(~valid, float("-inf"))
        w = torch.nan_to_num(weights.softmax(-1), nan=0.0)  # a caption without entities: no change
        return x + torch.einsum("be,betd->btd", w.to(x.dtype), maps)
