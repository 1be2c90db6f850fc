"""The packed copies rows.c runs are kept with the model between caches (Transformer.new_cache packed every
weight again on every generate call: 230-360 ms at the MUGE geometry) and made again whenever a weight's bytes
change, however they were changed; rows.fingerprint, which tells."""

import gc

import pytest
import torch

from t2i.models import attention as A
from t2i.models import rows
from t2i.models.transformer import Transformer
from t2i.sampling import generate

needs = pytest.mark.skipif(not rows.available(), reason=f"rows kernels unavailable: {rows.why_not()}")


def model(**kw):
    torch.manual_seed(0)
    return Transformer(text_vocab=50, text_len=6, image_vocab=64, image_grid=(3, 3), n_layer=2, n_head=4,
                       d_model=64, **kw).eval()


def fns(cache):
    """Every packed function a cache decodes with."""
    out = list(cache.packed.values())
    if cache.step is not None:
        out += [f for layer in cache.step.layers for f in layer[2:6]]
    return out


def logits(m, text, codes, cache=None):
    """Decode-step logits over a fresh cache against the uncached model, float32."""
    with torch.no_grad():
        cache = cache or m.new_cache(text.shape[0], "cpu")
        out = [m.prefill(text, cache)] + [m.decode_step(codes[:, i], i, cache) for i in range(codes.shape[1] - 1)]
        ref = [m.image_logits_uncached(text, codes[:, :i]) if i else m.prefill(text, None)
               for i in range(codes.shape[1])]
    return torch.stack(out), torch.stack(ref)


@needs
def test_fingerprint_sees_every_byte_and_not_the_thread_count():
    x = torch.randn(3 * (1 << 18) + 5)  # more than one 1 MiB chunk and a ragged tail
    base = rows.fingerprint(x)
    assert base is not None and base == rows.fingerprint(x.clone())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert rows.fingerprint(x) == base
    finally:
        torch.set_num_threads(threads)
    raw = x.view(torch.uint8)
    for at in (0, 63, 64, (1 << 20) - 1, 1 << 20, raw.numel() - 1):
        y = raw.clone()
        y[at] ^= 1
        assert rows.fingerprint(y) != base, at
    assert rows.fingerprint(x[:-1].clone()) != base and rows.fingerprint(x.bfloat16()) != base
    assert rows.fingerprint(x[::2]) is None  # not contiguous: cannot tell


@needs
def test_a_second_cache_reuses_the_packed_weights_and_still_decodes_right():
    m = model()
    first = fns(m.new_cache(4, "cpu"))
    second = fns(m.new_cache(8, "cpu"))  # another batch size: rows.c's layout does not depend on it
    assert first and all(a is b for a, b in zip(first, second))
    out, ref = logits(m, torch.randint(1, 50, (4, 6)), torch.randint(0, 64, (4, 9)))
    assert torch.allclose(out, ref, atol=1e-5)


@needs
@pytest.mark.parametrize("change", ["optimizer", "load_state_dict", "data", "to_bf16"])
def test_a_changed_weight_is_packed_again(change):
    m = model()
    text, codes = torch.randint(1, 50, (4, 6)), torch.randint(0, 64, (4, 9))
    before = fns(m.new_cache(4, "cpu"))
    if change == "optimizer":
        m.train()
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        m.loss(text, codes.view(4, 3, 3))[1].backward()
        opt.step()
        m.eval()
    elif change == "load_state_dict":
        other = model()
        with torch.no_grad():
            for p in other.parameters():
                p.mul_(1.5)
        m.load_state_dict(other.state_dict())
    elif change == "data":  # not seen by the version counter
        w = m.blocks[1].mlp.fc.weight
        w.data.copy_(w.data * -1)
    else:
        m = m.bfloat16()
    after = fns(m.new_cache(4, "cpu"))
    assert not any(a is b for a, b in zip(before, after)) if change != "data" else \
        sum(a is b for a, b in zip(before, after)) == len(before) - 1  # only the layer that changed
    out, ref = logits(m, text, codes)
    tol = 0.1 if change == "to_bf16" else 1e-5
    assert torch.allclose(out.float(), ref.float(), atol=tol), (out.float() - ref.float()).abs().max()


@needs
def test_train_and_deleting_the_model_drop_them():
    m = model()
    m.new_cache(4, "cpu")
    layers = [x for x in m.modules() if isinstance(x, torch.nn.Linear)]
    assert any(x in A._KEPT for x in layers)
    m.train()
    assert not any(x in A._KEPT for x in layers)
    m.eval().new_cache(4, "cpu")
    n = len(A._KEPT)
    del m, layers
    gc.collect()
    assert len(A._KEPT) < n


@needs
def test_generate_twice_draws_the_same_codes_and_autocast_keeps_its_own_copies():
    m = model()
    text = torch.randint(1, 50, (2, 6))
    runs = [generate(m, text, 4, top_k=8, generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(*runs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf = [fns(m.new_cache(4, "cpu")) for _ in range(2)]
    fp = fns(m.new_cache(4, "cpu"))
    assert all(a is b for a, b in zip(*bf)) and not any(a is b for a, b in zip(bf[0], fp))
