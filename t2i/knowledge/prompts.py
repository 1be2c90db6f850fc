"""Prompts -> linked entities at generation / evaluation time, with the lexicon the checkpoint carries.

Training batches carry ``entities`` / ``entity_spans`` made by the data layer; ``t2i-generate`` and
``t2i-eval`` link their prompts here, the same way: :meth:`EntityLexicon.link` (longest first, at most
``max_entities``), char spans -> token spans of the model's own text tokenizer
(:meth:`TextTokenizer.offsets`, :func:`entity_batch`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from t2i.errors import T2IError
from t2i.keys import LEXICON_KEY


def link_prompts(lexicon, tokenizer, prompts: list[str], text_len: int,
                 max_entities: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids LongTensor[B, max_entities], spans LongTensor[B, max_entities, 2])`` of ``prompts``; padding
    is id -1 / span (0, 0). Token positions are those of ``tokenizer.encode(prompts, text_len)``."""
    from t2i.knowledge.lexicon import entity_batch

    links = lexicon.link_many(list(prompts), max_entities)
    offsets = tokenizer.offsets(list(prompts), text_len)
    return entity_batch(links, offsets, text_len, max_entities)


@dataclass
class PromptLinker:
    """``linker(prompts) -> (ids, spans)`` for one model (its lexicon, tokenizer and ``text_len``)."""

    lexicon: object
    tokenizer: object
    text_len: int
    max_entities: int = 10

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return link_prompts(self.lexicon, self.tokenizer, prompts, self.text_len, self.max_entities)


def checkpoint_linker(ckpt: dict, model, tokenizer, where: str = "ckpt") -> PromptLinker | None:
    """The linker of a TransformerModule checkpoint whose model has knowledge (None without knowledge).

    The lexicon travels in the checkpoint (``t2i_entity_lexicon``); ``max_entities`` is the one the run
    was configured with (``hyper_parameters.knowledge.max_entities``, default 10)."""
    if getattr(model, "knowledge", None) is None:
        return None
    text = ckpt.get(LEXICON_KEY)
    if not text:
        raise T2IError(f"{where}: the model has a knowledge layer but the checkpoint carries no entity lexicon "
                       f"({LEXICON_KEY}); re-save it from a run with model.knowledge.lexicon set")
    from t2i.knowledge.lexicon import EntityLexicon

    hp = (ckpt.get("hyper_parameters") or {}).get("knowledge") or {}
    return PromptLinker(EntityLexicon.from_str(text), tokenizer, int(model.text_len),
                        int(hp.get("max_entities") or 10))
