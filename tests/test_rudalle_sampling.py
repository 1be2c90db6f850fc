"""Our cached sampler on imported ruDALL-E weights draws the codes ruDALL-E's own cached loop draws.

The reference loop is ``rudalle.pipelines.generate_images``' sampling loop, restated here because the
pipeline module cannot be imported (its package needs ``huggingface_hub.cached_download`` and it calls
``transformers.top_k_top_p_filtering``, gone from transformers 5): per image token one
``DalleModel(out, mask, use_cache=True, cache=cache)`` call, the last position's image logits, then the
most likely code (greedy) or a top-k-filtered ``torch.multinomial`` draw. The model calls and the cache
are rudalle's own. ``experiments/transformer_speed/rudalle_bench.py`` times the same two loops.
"""

from __future__ import annotations

import pytest
import torch

from t2i.models.transformer import Transformer
from t2i.pretrained import rudalle
from t2i.sampling import generate
from tests.peers import rudalle_module

pytestmark = pytest.mark.compat

T, SIDE, IMG, TXT = 8, 7, 24, 20  # 7 x 7 grid: the 11-wide conv window is clamped at every border


def reference(seed: int):
    DalleModel = rudalle_module("rudalle.dalle.model").DalleModel
    torch.manual_seed(seed)
    ref = DalleModel(device="cpu", num_layers=8, vocab_size=TXT + T, hidden_size=32, num_attention_heads=4,
                     embedding_dropout_prob=0.0, attention_dropout_prob=0.0, output_dropout_prob=0.0,
                     text_seq_length=T, image_tokens_per_dim=SIDE, image_vocab_size=IMG,
                     cogview_sandwich_layernorm=True, cogview_pb_relax=True, is_bool_mask=True, hf_version="v3")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every weight random (layer norms and position tables included)
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    ref.eval()
    sd = ref.state_dict()
    config = rudalle.infer_config(sd, T, 4, "test")
    ours = Transformer(**config)
    ours.load_state_dict(rudalle.convert_dalle(sd, config, "test"), strict=True)
    return ref, ours.eval()


def captions(seed: int, batch: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(4, TXT, (batch, T), generator=g)
    text[:, 0] = 2  # <BOS>
    text[0, 4], text[0, 5:] = 3, 0  # <EOS>, then pads
    text[1, 2], text[1, 3:] = 3, 0
    return text


@torch.no_grad()
def rudalle_loop(dalle, text: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """Their cached loop; ``top_k=None``: greedy (what ``top_k=1`` draws)."""
    vocab, total = dalle.get_param("vocab_size"), dalle.get_param("total_seq_length")
    mask = torch.tril(torch.ones((text.shape[0], 1, total, total)))
    out, cache = text, None
    for _ in range(text.shape[1], total):
        logits, cache = dalle(out, mask, use_cache=True, cache=cache, return_loss=False)
        logits = logits[:, -1, vocab:]
        if top_k is None:
            sample = logits.argmax(-1, keepdim=True)
        else:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            sample = torch.multinomial(logits.masked_fill(logits < kth, float("-inf")).softmax(-1), 1)
        out = torch.cat((out, sample), dim=-1)
    return out[:, T:].view(-1, SIDE, SIDE)


def test_greedy_codes_equal_rudalle_cached_loop():
    ref, ours = reference(seed=22)
    text = captions(seed=22)
    theirs = rudalle_loop(ref, text, None)
    assert theirs.unique().numel() > 3  # not a degenerate constant image
    for use_cache in (True, False):
        assert torch.equal(generate(ours, text, 1, temperature=0, use_cache=use_cache), theirs), use_cache


def test_top_k_draws_equal_rudalle_cached_loop():
    """Same filter, same probabilities, same random stream: the same sampled codes."""
    ref, ours = reference(seed=31)
    text = captions(seed=32)
    torch.manual_seed(7)
    theirs = rudalle_loop(ref, text, top_k=6)
    drawn = generate(ours, text, 1, top_k=6, use_cache=True, generator=torch.Generator().manual_seed(7))
    assert theirs.unique().numel() > 6
    assert torch.equal(drawn, theirs)
