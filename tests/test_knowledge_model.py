"""The knowledge fusion layer (ARTIST) in the transformer: closed gate == no knowledge, cache == no cache,
input fusion reaches every image position, EasyNLP's fusion only the first, guidance has no entities."""

from __future__ import annotations

import pytest
import torch

from t2i.errors import ConfigError
from t2i.models.transformer import Transformer
from t2i.sampling import generate

T, SIDE, N_ENT, DIM = 6, 3, 12, 5


def model(knowledge: dict | None, seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(text_vocab=20, text_len=T, image_vocab=16, image_grid=(SIDE, SIDE), n_layer=2, n_head=2,
                    d_model=16, attention="full", knowledge=knowledge, **kw)
    return m.eval()


def open_knowledge(m: Transformer, seed: int = 1) -> Transformer:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.knowledge.table.copy_(torch.randn(m.knowledge.table.shape, generator=g))
        m.knowledge.proj.weight.copy_(torch.randn(m.knowledge.proj.weight.shape, generator=g))
        m.knowledge.proj.bias.copy_(torch.randn(m.knowledge.proj.bias.shape, generator=g) * 0.1)
        if m.knowledge.gate is not None:
            m.knowledge.gate.fill_(0.7)
    return m


def links():
    ids = torch.tensor([[3, 7, -1], [-1, -1, -1], [0, 11, 5]])
    spans = torch.tensor([[[0, 2], [1, 4], [0, 0]], [[0, 0], [0, 0], [0, 0]], [[2, 3], [2, 5], [0, 6]]])
    return ids, spans


def batch(seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 20, (3, T), generator=g), torch.randint(0, 16, (3, SIDE * SIDE), generator=g)


KNOW = {"num_entities": N_ENT, "dim": DIM, "trainable": False, "fusion": "input"}


def test_closed_gate_equals_the_model_without_knowledge_bit_for_bit():
    plain, know = model(None), model(KNOW)
    missing, unexpected = know.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("knowledge.") for k in missing)
    with torch.no_grad():
        know.knowledge.table.normal_()  # real vectors, gate still closed
        text, image = batch()
        a = plain(text, image)[1]
        b = know(text, image, links())[1]
    assert torch.equal(a, b)


@pytest.mark.parametrize("fusion", ["input", "easynlp"])
def test_cache_equals_no_cache_with_knowledge(fusion):
    m = open_knowledge(model({**KNOW, "fusion": fusion}))
    text, _ = batch()
    for cfg in (None, 3.0):
        runs = [generate(m, text, num_samples=2, top_k=5, cfg_scale=cfg, use_cache=c, entities=links(),
                         generator=torch.Generator().manual_seed(4)) for c in (True, False)]
        assert torch.equal(runs[0], runs[1])


def test_input_fusion_reaches_every_image_position_easynlp_only_the_first():
    text, image = batch()
    for fusion, changed in (("input", SIDE * SIDE), ("easynlp", 1)):
        m = open_knowledge(model({**KNOW, "fusion": fusion}))
        with torch.no_grad():
            without = m(text, image)[1]
            with_k = m(text, image, links())[1]
        diff = (with_k - without).abs().amax(-1)  # [B, positions]
        assert int((diff[0] > 1e-6).sum()) == changed, fusion
        assert torch.equal(with_k[1], without[1])  # the caption without entities is unchanged


def test_easynlp_fusion_follows_the_released_formula():
    """EasyNLP: words_emb [B, E, T, 100] (the vector where the entity is, zeros elsewhere) -> ent_emb (Linear with
    bias) -> one weight per entity = <all text states, its map> -> softmax -> text states + weighted sum of maps."""
    m = open_knowledge(model({**KNOW, "fusion": "easynlp"}))
    k = m.knowledge
    x = torch.randn(3, T, 16)
    ids, spans = links()
    words = torch.zeros(3, 3, T, DIM)
    for b in range(3):
        for e in range(3):
            if ids[b, e] >= 0:
                words[b, e, spans[b, e, 0]:spans[b, e, 1]] = k.table[ids[b, e]]
    with torch.no_grad():
        maps = k.proj(words)
        w = (x.reshape(3, 1, -1) @ maps.reshape(3, 3, -1).transpose(1, 2)).squeeze(1)
        w = w.masked_fill(ids < 0, float("-inf")).softmax(-1).nan_to_num(0.0)
        expected = x + (w[:, :, None, None] * maps).sum(1)
        got = k(x, ids, spans)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_entity_table_frozen_or_trainable():
    frozen = model(KNOW)
    assert "knowledge.table" not in dict(frozen.named_parameters()) and "knowledge.table" in frozen.state_dict()
    trainable = model({**KNOW, "trainable": True})
    assert dict(trainable.named_parameters())["knowledge.table"].requires_grad


def test_bad_knowledge_settings_are_clear():
    with pytest.raises(ConfigError, match="fusion='after'"):
        model({**KNOW, "fusion": "after"})
    m = model(KNOW)
    text, image = batch()
    with pytest.raises(ConfigError, match="entity id 40 is outside the entity table"):
        m(text, image, (torch.tensor([[40], [0], [0]]), torch.zeros(3, 1, 2, dtype=torch.long)))
