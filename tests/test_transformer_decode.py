"""The cached decode step's fast path: linear layers packed once per cache, results equal to the plain layers."""

import pytest
import torch

from t2i.models.attention import pack_linear
from t2i.models.transformer import Transformer


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
    if pack_linear(tiny().image_head, 2) is None:
        pytest.skip("this torch build has no MKL / oneDNN linear")
    m = tiny().to(dtype)
    cache = m.new_cache(2, "cpu", dtype)
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no oneDNN bf16 linear")
    assert cache.step is not None and len(cache.step.layers) == m.n_layer  # the blocks: a written-out step
    assert cache.step.fused == torch.backends.mkldnn.is_available()  # residual adds and GELU inside the GEMMs
    assert set(cache.packed) == {(m.image_head, None), (m.text_head, None)}
    m = tiny(sandwich_ln=True).to(dtype)  # a block DecodeStep does not cover: packed layer by layer
    cache = m.new_cache(2, "cpu", dtype)
    fused = torch.backends.mkldnn.is_available()  # oneDNN fuses the GELU (MKL, float32 only, cannot)
    layers = [(x, None) for b in m.blocks for x in (b.attn.qkv, b.attn.proj, b.mlp.proj)] + \
        [(b.mlp.fc, "none" if fused else None) for b in m.blocks] + [(m.image_head, None), (m.text_head, None)]
    assert cache.step is None and set(cache.packed) == set(layers)


@pytest.mark.parametrize("pattern", ["full", "dalle", "axial_row", "conv"])
def bf16_error(m, logits, text, img):
    """Max |logits - reference| of a bfloat16 model's decode-step ``logits``, the reference being the same
    weights in float32 (so only the activations' rounding is measured), over the same steps."""
    ref = m.float()
    try:
        want = step_logits(ref, text, img, ref.new_cache(2, "cpu", torch.float32))
    finally:
        m.to(torch.bfloat16)
    return (logits.float() - want).abs().max().item()


@pytest.mark.parametrize("pattern", ["full", "dalle", "axial_row", "conv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_step_equals_the_module_path(pattern, dtype):
    """The written-out step against Block.forward over the same cache. float32: oneDNN fuses adds, GELU and
    the query scale into its GEMMs (rounding may differ), within 1e-5. bfloat16: the fused GEMMs round once
    where the module path rounds twice, so the two differ by bfloat16 rounding; both must stay as close to
    the float32 model as the module path is (within 1.5x its error + 1e-3; both are about 0.002)."""
    for kw in ({}, {"head_bias": True, "logits_ln": True, "gelu": "tanh"}, {"attn_impl": "math"}):
        m = tiny(attention=pattern, **kw).to(dtype)
        text, img = captions(), torch.randint(0, 24, (2, 12))
        fast, slow = m.new_cache(2, "cpu", dtype), m.new_cache(2, "cpu", dtype)
        if fast.step is None:
            pytest.skip("no packed linear on this build")
        slow.step = None
        a, b = step_logits(m, text, img, fast), step_logits(m, text, img, slow)
        if dtype == torch.float32:
            assert torch.allclose(a, b, atol=1e-5, rtol=0), (kw, (a - b).abs().max())
            for x, y in zip(fast.k + fast.v, slow.k + slow.v):
                assert torch.allclose(x[:, :, :16], y[:, :, :16], atol=1e-5, rtol=0)
            continue
        fast_err, slow_err = bf16_error(m, a, text, img), bf16_error(m, b, text, img)
        assert fast_err <= 1.5 * slow_err + 1e-3, (kw, fast_err, slow_err)


def test_decode_step_follows_reorder_and_captioning():
    m = tiny(captioning=True)
    img = torch.randint(0, 24, (2, 12))
    fast, slow = m.new_cache(2, "cpu", torch.float32), m.new_cache(2, "cpu", torch.float32)
    assert fast.step is not None
    slow.step = None
    idx = torch.tensor([1, 1, 0])
    with torch.no_grad():
        outs = []
        for cache in (fast, slow):
            m.caption_prefill(img, cache)
            cache.reorder(idx)  # new cache tensors: the step must read them, not the old ones
            tok = torch.tensor([3, 4, 5])
            outs.append(torch.stack([m.caption_step(tok + j, j, cache) for j in range(4)]))
    assert torch.allclose(outs[0], outs[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_decode_steps_equal_plain_layers(dtype):
    """oneDNN's packed GEMM (and its fused GELU) may round differently from F.linear: within 1e-5 in float32;
    in bfloat16 the fused GELU rounds once where F.gelu(F.linear) rounds twice, so both are held to the
    float32 model instead (within 1.5x of the plain layers' error)."""
    m = tiny(sandwich_ln=True).to(dtype)
    text, img = captions(), torch.randint(0, 24, (2, 12))
    packed = m.new_cache(2, "cpu", dtype)
    plain = m.new_cache(2, "cpu", dtype)
    plain.packed.clear()
    a, b = step_logits(m, text, img, packed), step_logits(m, text, img, plain)
    if dtype == torch.float32:
        assert torch.allclose(a, b, atol=1e-5, rtol=0)
    else:
        fast_err, slow_err = bf16_error(m, a, text, img), bf16_error(m, b, text, img)
        assert fast_err <= 1.5 * slow_err + 1e-3, (fast_err, slow_err)


def test_packed_layers_are_skipped_when_a_gradient_is_needed():
    m = tiny()
    text = captions()
    cache = m.new_cache(2, "cpu", torch.float32)
    m.prefill(text, cache).sum().backward()
    assert m.blocks[0].attn.qkv.weight.grad is not None


def test_bf16_cached_logits_stay_as_close_to_float32_as_uncached():
    """bfloat16 rounds every activation, and the cached step (8 rows per GEMM, attention in float32 over the
    cache) rounds in other places than the full forward (8 x 80 rows, SDPA), so the two do not draw the
    same codes in general (at 8 x 8 codes, 6 x 512, neither did they before the float32 step attention: 13
    to 23 of 32 samples parted somewhere). What holds is the error: against the float32 model with the same
    (bfloat16-rounded) weights, the cached logits are within 1.5x of the full forward's error."""
    torch.manual_seed(0)
    m = Transformer(text_vocab=100, text_len=8, image_vocab=256, image_grid=(6, 6), n_layer=4, n_head=4,
                    d_model=128, attention="dalle", conv_kernel=3).eval().to(torch.bfloat16)
    ref = Transformer(text_vocab=100, text_len=8, image_vocab=256, image_grid=(6, 6), n_layer=4, n_head=4,
                      d_model=128, attention="dalle", conv_kernel=3).eval()
    ref.load_state_dict({k: v.float() for k, v in m.state_dict().items()})
    text, img = torch.randint(1, 100, (4, 8)), torch.randint(0, 256, (4, 36))
    with torch.no_grad():
        want = ref(text, img)[1]
        full = m(text, img)[1].float()
        cache = m.new_cache(4, "cpu", torch.bfloat16)
        assert cache.step is not None or not torch.backends.mkldnn.is_available()
        cached = torch.stack([m.prefill(text, cache)] + [m.decode_step(img[:, i], i, cache) for i in range(35)], 1)
    full_err, cached_err = ((x.float() - want).abs() for x in (full, cached))
    assert cached_err.max() <= 1.5 * full_err.max() and cached_err.mean() <= 1.2 * full_err.mean(), \
        (cached_err.max(), full_err.max(), cached_err.mean(), full_err.mean())
    assert full_err.max() < 0.1 * want.std()  # bfloat16 rounding, not a wrong computation


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


def test_decode_step_without_onednn_uses_mkl(monkeypatch):
    """A torch build without oneDNN: float32 packs with MKL, nothing fused; same logits as the module path."""
    if not torch.backends.mkl.is_available():
        pytest.skip("no MKL in this build")
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    m = tiny()
    text, img = captions(), torch.randint(0, 24, (2, 12))
    fast, slow = m.new_cache(2, "cpu", torch.float32), m.new_cache(2, "cpu", torch.float32)
    assert fast.step is not None and not fast.step.fused
    slow.step = None
    a, b = step_logits(m, text, img, fast), step_logits(m, text, img, slow)
    assert torch.allclose(a, b, atol=1e-5, rtol=0)


def test_a_cache_is_freed_without_the_garbage_collector():
    """The cache holds its DecodeStep, not the reverse: dropping the last reference frees the KV tensors and
    packed weights at once (a reference cycle would keep hundreds of MB alive per generate call until gc)."""
    import gc
    import weakref

    m = tiny()
    cache = m.new_cache(2, "cpu", torch.float32)
    assert cache.step is not None
    ref = weakref.ref(cache.k[0])
    gc.disable()
    try:
        del cache
        assert ref() is None
    finally:
        gc.enable()


def test_cpu_autocast_builds_a_bf16_step_that_computes_what_autocast_does():
    """Under CPU autocast to bfloat16 over float32 weights (Pipeline(dtype="bf16")), new_cache packs bfloat16
    copies once (autocast would cast every weight on every step) and its step is used while that autocast is
    on: as close to the float32 model as the module path under autocast is. Without autocast the same cache
    falls back to the float32 module path; under float16 autocast nothing is packed."""
    m = tiny(attention="dalle")
    text, img = captions(), torch.randint(0, 24, (2, 12))
    want = step_logits(m, text, img, m.new_cache(2, "cpu"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast, slow = m.new_cache(2, "cpu"), m.new_cache(2, "cpu")
        if fast.step is None:
            pytest.skip("no oneDNN bf16 linear on this build")
        assert fast.autocast == torch.bfloat16 and fast.k[0].dtype == torch.bfloat16  # keys come out of bf16 GEMMs
        with torch.no_grad():
            assert fast.step.usable(torch.zeros(2, 1, 32))
        slow.step, slow.packed = None, {}
        a, b = step_logits(m, text, img, fast), step_logits(m, text, img, slow)  # the step vs autocast's F.linear
    assert a.dtype == b.dtype == torch.bfloat16
    fast_err, slow_err = ((x.float() - want).abs().max().item() for x in (a, b))
    assert 0 < fast_err <= 1.5 * slow_err + 1e-3, (fast_err, slow_err)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cache = m.new_cache(2, "cpu", torch.float32)
    with torch.no_grad():
        assert not cache.step.usable(torch.zeros(2, 1, 32))  # autocast off now: the float32 module path
    assert torch.allclose(step_logits(m, text, img, cache), want, atol=1e-5, rtol=0)
    with torch.autocast("cpu", dtype=torch.float16):
        cache = m.new_cache(2, "cpu")
        assert cache.step is None and not cache.packed and cache.k[0].dtype == torch.float16
        assert torch.isfinite(step_logits(m, text, img, cache).float()).all()
