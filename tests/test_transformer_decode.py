"""The cached decode step's fast path: linear layers packed once per cache, results equal to the plain layers."""

import pytest
import torch

from t2i.models.attention import pack_linear
from t2i.models.transformer import Transformer
from t2i.sampling import generate


def tiny(**kw) -> Transformer:
    torch.manual_seed(0)
    args = dict(text_vocab=40, text_len=5, image_vocab=24, image_grid=(4, 3), n_layer=4, n_head=2, d_model=32,
                attention="dalle", conv_kernel=3)
    args.update(kw)
    return Transformer(**args).eval()


def captions(b=2):
    text = torch.randint(1, 40, (b, 5), generator=torch.Generator().manual_seed(1))
    text[:, 3:] = 0
    return text


def step_logits(m, text, img, cache):
    with torch.no_grad():
        return torch.stack([m.prefill(text, cache)] + [m.decode_step(img[:, i], i, cache) for i in range(11)], 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_new_cache_packs_every_decode_linear(dtype):
    m = tiny().to(dtype)
    cache = m.new_cache(2, "cpu", dtype)
    if pack_linear(m.image_head, 2) is None:
        pytest.skip("this torch build has no MKL / oneDNN bf16 linear")
    fused = dtype == torch.float32 and torch.backends.mkldnn.is_available()  # oneDNN fuses the GELU in float32
    layers = [(x, None) for b in m.blocks for x in (b.attn.qkv, b.attn.proj, b.mlp.proj)] + \
        [(b.mlp.fc, "none" if fused else None) for b in m.blocks] + [(m.image_head, None), (m.text_head, None)]
    assert set(cache.packed) == set(layers)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 0.0)])
def test_packed_decode_steps_equal_plain_layers(dtype, atol):
    """fp32: oneDNN's packed GEMM (and its fused GELU) may round differently from F.linear; bf16: oneDNN runs
    both, bit-equal."""
    m = tiny(sandwich_ln=True).to(dtype)
    text, img = captions(), torch.randint(0, 24, (2, 12))
    packed = m.new_cache(2, "cpu", dtype)
    plain = m.new_cache(2, "cpu", dtype)
    plain.packed.clear()
    a, b = step_logits(m, text, img, packed), step_logits(m, text, img, plain)
    assert torch.allclose(a.float(), b.float(), atol=atol, rtol=0)


def test_packed_layers_are_skipped_when_a_gradient_is_needed():
    m = tiny()
    text = captions()
    cache = m.new_cache(2, "cpu", torch.float32)
    m.prefill(text, cache).sum().backward()
    assert m.blocks[0].attn.qkv.weight.grad is not None


def test_bf16_cached_sampling_equals_uncached():
    m = tiny().to(torch.bfloat16)
    text = captions()
    a = generate(m, text, 3, top_k=8, generator=torch.Generator().manual_seed(5))
    b = generate(m, text, 3, top_k=8, use_cache=False, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


@pytest.mark.parametrize("pattern", ["full", "row", "column", "conv", "axial_row"])
def test_key_segments_cover_exactly_the_mask_row(pattern):
    from t2i.models.attention import key_segments, sequence_mask

    mask = sequence_mask(pattern, 6, 5, 7, kernel=3)
    for pos in range(mask.shape[0]):
        row = mask[pos, :pos + 1]
        pieces = key_segments(row)
        if pieces is None:
            assert row.all()
            continue
        idx = torch.arange(pos + 1)
        got = torch.cat([idx[p] if isinstance(p, slice) else p for p in pieces])
        assert torch.equal(got, row.nonzero()[:, 0])
        assert sum(isinstance(p, slice) for p in pieces) <= 2 and len(pieces) <= 3
