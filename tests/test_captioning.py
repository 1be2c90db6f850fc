"""The image -> text direction: its mask, cached == uncached decoding, beam 1 == greedy, the likelihood score,
and a joint model with caption weight 0 training exactly as a text -> image-only model."""

from __future__ import annotations

import pytest
import torch

from t2i.captioning import caption
from t2i.errors import ConfigError
from t2i.models.attention import caption_mask, image_mask
from t2i.models.transformer import Transformer

T, SIDE = 5, 3


def model(captioning=True, seed=0, **kw) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(text_vocab=12, text_len=T, image_vocab=10, image_grid=(SIDE, SIDE), n_layer=2, n_head=2,
                    d_model=16, attention=["row", "conv"], conv_kernel=3, captioning=captioning, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # spread the logits so decoding choices are not ties
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return m.eval()


def codes(seed=0, batch=3):
    return torch.randint(0, 10, (batch, SIDE, SIDE), generator=torch.Generator().manual_seed(seed))


def test_caption_mask():
    m = caption_mask("row", T, SIDE, SIDE)
    n = SIDE * SIDE
    assert torch.equal(m[:n, :n], image_mask("row", SIDE, SIDE)) and not m[:n, n:].any()
    assert m[n:, :n].all() and torch.equal(m[n:, n:], torch.ones(T, T, dtype=torch.bool).tril())


@pytest.mark.parametrize("method", ["greedy", "beam", "sample"])
def test_cached_captions_equal_uncached(method):
    m = model()
    runs = [caption(m, codes(), method=method, beam_size=3, top_k=5, use_cache=c,
                    generator=torch.Generator().manual_seed(2)) for c in (True, False)]
    assert torch.equal(runs[0], runs[1])


def test_beam_size_one_is_greedy_and_beams_score_at_least_as_well():
    m = model(seed=3)
    c = codes(1, batch=6)
    greedy = caption(m, c, method="greedy")
    assert torch.equal(caption(m, c, method="beam", beam_size=1), greedy)
    wide = caption(m, c, method="beam", beam_size=6, length_penalty=0.0)  # no length term: pure log-probability
    assert (m.caption_logprob(c, wide) * lengths(m, wide) >= m.caption_logprob(c, greedy) * lengths(m, greedy) - 1e-5).all()


def lengths(m, text):
    pad = text == m.text_pad_id
    return ((~pad) | (pad & (pad.long().cumsum(1) == 1))).sum(1)


def test_captions_are_tokens_then_pads():
    m = model(seed=5)
    out = caption(m, codes(2, batch=8), method="sample", temperature=1.5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (8, T) and int(out.max()) < m.text_vocab
    pad = out == m.text_pad_id
    for row in pad:  # once a pad, always a pad
        first = int(row.float().argmax()) if row.any() else T
        assert row[first:].all()


def test_caption_logprob_is_the_mean_over_tokens_and_the_end():
    m = model(seed=7)
    c = codes(3, batch=2)
    text = torch.tensor([[3, 4, 0, 0, 0], [5, 6, 7, 8, 9]])  # 0 is the pad id
    logits = m.caption_forward(c, text).log_softmax(-1)
    ids = m.text_ids(text)
    tok = logits.gather(-1, ids[..., None])[..., 0]
    expected = torch.stack([tok[0, :3].mean(), tok[1].mean()])
    torch.testing.assert_close(m.caption_logprob(c, text), expected)


def test_a_model_without_the_direction_says_so():
    with pytest.raises(ConfigError, match="captioning=true"):
        caption(model(captioning=False), codes())
    with pytest.raises(ConfigError, match="beam_size"):
        caption(model(), codes(), beam_size=0)


def test_joint_model_with_caption_weight_zero_trains_like_the_t2i_model():
    from t2i.lit.transformer import TransformerModule

    def module(captioning, wc):
        torch.manual_seed(0)
        cfg = dict(text_vocab=12, text_pad_id=0, text_len=T, image_vocab=10, image_grid=[SIDE, SIDE], n_layer=2,
                   n_head=2, d_model=16, dropout=0.1, attention="full", captioning=captioning)
        return TransformerModule(model=cfg, lr=1e-2, warmup_steps=0, schedule="constant", cond_drop_prob=0.2,
                                 caption_loss_weight=wc)

    a, b = module(False, 0.0), module(True, 0.0)
    joint = module(True, 1.0)
    shared = {k: v for k, v in b.model.state_dict().items() if k != "caption_emb"}
    assert all(torch.equal(v, a.model.state_dict()[k]) for k, v in shared.items())
    batch = {"text": torch.randint(1, 12, (4, T)), "codes": codes(4, batch=4)}
    losses = []
    for mod in (a, b, joint):
        opt = torch.optim.AdamW(mod.parameters(), lr=1e-2)
        torch.manual_seed(1)
        mod.train()
        for _ in range(3):
            loss = mod._losses(batch)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses.append(float(loss))
    assert losses[0] == losses[1] and losses[2] != losses[0]
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
