"""Stage-2 transformer: attention masks against a brute-force reference, cached vs uncached sampling,
classifier-free guidance, the loss and the model options."""

import pytest
import torch

from t2i.errors import ConfigError
from t2i.models.attention import layer_patterns, sequence_mask
from t2i.models.transformer import Transformer
from t2i.sampling import filter_logits, generate


def reference_allowed(pattern: str, q: int, k: int, text_len: int, w: int, kernel: int) -> bool:
    """The issue's definition, one pair at a time."""
    if k > q:
        return False
    if q < text_len:
        return True  # text: causal over earlier text (k <= q < text_len)
    if k < text_len:
        return True  # image queries see all text
    ri, rj = q - text_len, k - text_len
    yi, xi, yj, xj = ri // w, ri % w, rj // w, rj % w
    if pattern == "full":
        return True
    if pattern == "row":
        return ri - rj <= w
    if pattern == "column":
        return xj == xi
    if pattern == "conv":
        return abs(yi - yj) <= kernel // 2 and abs(xi - xj) <= kernel // 2
    if pattern == "axial_row":
        return yj == yi
    raise AssertionError(pattern)


@pytest.mark.parametrize("grid", [(4, 4), (5, 3), (3, 5)])
@pytest.mark.parametrize("pattern", ["full", "row", "column", "conv", "axial_row"])
@pytest.mark.parametrize("kernel", [3, 11])
def test_masks_match_brute_force(grid, pattern, kernel):
    h, w = grid
    text_len = 3
    got = sequence_mask(pattern, text_len, h, w, kernel)
    n = text_len + h * w
    want = torch.tensor([[reference_allowed(pattern, q, k, text_len, w, kernel) for k in range(n)]
                         for q in range(n)])
    assert torch.equal(got, want)


def test_row_pattern_includes_token_above_and_conv_is_local():
    m = sequence_mask("row", 0, 4, 4)
    assert m[5, 1] and m[5, 4] and not m[5, 0]  # (1,1) sees (0,1) directly above, not (0,0)
    c = sequence_mask("conv", 0, 5, 5, kernel=3)
    assert c[12, 6] and not c[12, 2] and not c[12, 10]  # (2,2): (1,1) yes, (0,2) no, (2,0) no


def test_dalle_schedule():
    # layers counted from 1: column where (i - 2) % 4 == 0, row elsewhere, conv on the last
    assert layer_patterns("dalle", 8) == ["row", "column", "row", "row", "row", "column", "row", "conv"]
    assert layer_patterns("full", 3) == ["full"] * 3
    assert layer_patterns("column", 2) == ["column", "column"]
    assert layer_patterns(["row", "conv"], 2) == ["row", "conv"]
    with pytest.raises(ConfigError, match="2 patterns for 3 layers"):
        layer_patterns(["row", "conv"], 3)
    with pytest.raises(ConfigError, match="unknown"):
        layer_patterns("diagonal", 3)


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


def test_logits_respect_masks():
    """Changing an image code that a position may not see leaves that position's logits unchanged."""
    m = tiny(attention="column", n_layer=2)
    text, img = captions(1), torch.randint(0, 24, (1, 12))
    _, base = m(text, img)
    img2 = img.clone()
    img2[0, 1] = (img[0, 1] + 1) % 24  # image token 1 at (0, 1): input position of query for token 2
    _, changed = m(text, img2)
    # query at image index 3 (0,... raster 3 = (1,0)) is in column 0: it never sees raster 1 (column 1)
    assert torch.allclose(base[0, 4], changed[0, 4], atol=1e-6)  # logits for token 4 come from raster 3
    assert not torch.allclose(base[0, 5], changed[0, 5], atol=1e-6)  # raster 4 = (1,1) sees (0,1)


@pytest.mark.parametrize("opts", [
    dict(attention="full"), dict(attention="dalle"), dict(attention="axial_row"),
    dict(attention=["row", "column", "conv", "full"], rotary=True),
    dict(attention="dalle", sandwich_ln=True, pb_relax=True, tie_weights=True),
])
def test_cached_equals_uncached_sampling(opts):
    m = tiny(**opts)
    text = captions()
    for kw in (dict(top_k=8), dict(top_p=0.9, temperature=0.8), dict(cfg_scale=3.0, top_k=8)):
        a = generate(m, text, 3, use_cache=True, generator=torch.Generator().manual_seed(5), **kw)
        b = generate(m, text, 3, use_cache=False, generator=torch.Generator().manual_seed(5), **kw)
        assert a.shape == (6, 4, 3)
        assert torch.equal(a, b), kw


def test_cached_logits_match_full_forward():
    m = tiny(rotary=True)
    text, img = captions(), torch.randint(0, 24, (2, 12))
    _, full = m(text, img)
    cache = m.new_cache(2, "cpu", torch.float32)
    steps = [m.prefill(text, cache)] + [m.decode_step(img[:, i], i, cache) for i in range(11)]
    assert torch.allclose(torch.stack(steps, 1), full, atol=1e-5)


def test_cfg_scale_one_is_conditional_sampling():
    m = tiny()
    text = captions()
    plain = generate(m, text, 2, cfg_scale=None, generator=torch.Generator().manual_seed(0))
    guided_one = generate(m, text, 2, cfg_scale=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(plain, guided_one)
    strong = generate(m, text, 2, cfg_scale=4.0, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(plain, strong)


def test_priming_keeps_the_given_codes():
    m = tiny()
    text, img = captions(), torch.randint(0, 24, (2, 4, 3))
    out = generate(m, text, 2, prime=img[:, :1].flatten(1), generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[:, 0], img[:, 0].repeat_interleave(2, 0))
    with pytest.raises(ValueError, match="grid has only"):
        generate(m, text, 1, prime=img.flatten(1))


def test_filter_logits():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[True, False, False, True]]
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert torch.isinf(filter_logits(p, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(p, top_p=0.01)).tolist() == [[False, True, True, True]]


def test_pads_become_position_ids_and_loss():
    m = tiny()
    text = captions()
    ids = m.text_ids(text)
    assert ids[0, 3] == 40 + 3 and ids[1, 4] == 40 + 4 and torch.equal(ids[:, :3], text[:, :3])
    tl, il = m.loss(text, torch.randint(0, 24, (2, 4, 3)))
    assert abs(il.item() - torch.log(torch.tensor(24.0)).item()) < 0.3  # near uniform at init
    assert tl.item() > 0
    with pytest.raises(ConfigError, match="text_len"):
        m.text_ids(torch.zeros(2, 4, dtype=torch.long))


def test_gradients_reach_every_parameter():
    m = tiny(sandwich_ln=True).train()
    tl, il = m.loss(captions(), torch.randint(0, 24, (2, 12)))
    (tl + 7 * il).backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert not missing


@pytest.mark.parametrize("attention", ["full", "dalle", "axial_row"])
def test_math_attention_equals_sdpa(attention):
    """attn_impl=math (explicit softmax) gives sdpa's logits and gradients, and caches the same."""
    a = tiny(attention=attention, attn_impl="sdpa", dropout=0.0)
    b = tiny(attention=attention, attn_impl="math", dropout=0.0)
    b.load_state_dict(a.state_dict())
    text, img = captions(), torch.randint(0, 24, (2, 12))
    for m in (a, b):
        tl, il = m.loss(text, img)
        (tl + 7 * il).backward()
    assert torch.allclose(a(text, img)[1], b(text, img)[1], atol=1e-5)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-5), name
    with torch.no_grad():
        ca, cb = (generate(m, text, 2, top_k=5, generator=torch.Generator().manual_seed(3)) for m in (a, b))
    assert torch.equal(ca, cb)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():  # bf16 matmuls, float32 softmax
        assert torch.allclose(a(text, img)[1].float(), b(text, img)[1].float(), atol=0.1)


def test_unknown_attn_impl_is_a_config_error():
    with pytest.raises(ConfigError, match="attn_impl='fast'.*sdpa, math, flex"):
        tiny(attn_impl="fast")


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["full", "dalle"])
def test_flex_equals_sdpa(attention):
    torch.manual_seed(0)
    a = tiny(attention=attention, attn_impl="sdpa", image_grid=(8, 8), text_len=16)
    b = tiny(attention=attention, attn_impl="flex", image_grid=(8, 8), text_len=16)
    b.load_state_dict(a.state_dict())
    text = torch.randint(1, 40, (2, 16))
    img = torch.randint(0, 24, (2, 64))
    with torch.no_grad():  # FlexAttention has no backward on CPU
        ta, ia = a(text, img)
        tb, ib = b(text, img)
    assert torch.allclose(ia, ib, atol=1e-4) and torch.allclose(ta, tb, atol=1e-4)
