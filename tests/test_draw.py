"""t2i.models.rows.multinomial (draw.c): torch.multinomial(p, 1)'s CPU draw, the same index for the same
generator state and the generator left where torch leaves it, checked against torch itself; its fallbacks;
and generate() drawing the codes it drew with torch.multinomial."""

import threading

import pytest
import torch

from t2i.models import rows
from t2i.models.transformer import Transformer
from t2i.sampling import generate

needs = pytest.mark.skipif(not rows.available(), reason=f"rows kernels unavailable: {rows.why_not()}")


@needs
def test_the_draw_agrees_with_this_torch():
    """Where the kernels build, the once-per-process check against torch.multinomial passes (else every
    draw would quietly fall back to torch: this says so instead)."""
    assert rows._draw_agrees(), rows._state.get("draw_why")


@pytest.fixture(autouse=True)
def ieee():
    """IEEE subnormals unless a test asks for flushing (in-process t2i-train / t2i-eval tests leave it on)."""
    torch.set_flush_denormal(False)
    yield


@pytest.fixture(params=[False, True], ids=["ieee", "flush_denormal"])
def flush(request):
    """t2i-train and t2i-eval run with torch.set_flush_denormal(True): the draws must agree there too (torch
    sets it in the calling thread only; subnormal inputs are then left to torch)."""
    torch.set_flush_denormal(request.param)
    yield request.param
    torch.set_flush_denormal(False)


def twins(seed: int, skip: int = 0):
    """Two generators in one state, ``skip`` words into the stream (odd positions included)."""
    g = torch.Generator().manual_seed(seed)
    torch.randint(0, 2, (skip,), generator=g)  # one 32-bit word each
    a, b = torch.Generator(), torch.Generator()
    a.set_state(g.get_state())
    b.set_state(g.get_state())
    return a, b


def probs_like(R, V, seed, top_k=None, top_p=None, scale=3.0):
    from t2i.sampling import filter_logits

    x = torch.randn(R, V, generator=torch.Generator().manual_seed(seed)) * scale
    return filter_logits(x, top_k, top_p).softmax(-1)


def same_as_torch(probs, seed, skip=0):
    a, b = twins(seed, skip)
    want = torch.multinomial(probs, 1, generator=a)
    got = rows.multinomial(probs, b)
    assert got.shape == want.shape == (probs.shape[0], 1) and got.dtype == torch.int64
    assert torch.equal(got, want)
    assert torch.equal(a.get_state(), b.get_state())
    assert torch.equal(torch.rand(7, generator=a), torch.rand(7, generator=b))  # the streams go on alike


@needs
@pytest.mark.parametrize("R, V", [(1, 1), (1, 7), (3, 8), (2, 9), (5, 100), (8, 16384), (1, 50000)])
@pytest.mark.parametrize("filt", [dict(), dict(top_k=1), dict(top_k=5), dict(top_k=256), dict(top_p=0.9)])
def test_draws_what_torch_draws(R, V, filt):
    for seed in range(6):
        same_as_torch(probs_like(R, V, seed, **filt), seed, skip=seed)


@needs
def test_many_states_and_block_boundaries():
    """Every stream position mod 624 the mt19937 state is remade at, across several remakes in one draw."""
    for skip in list(range(0, 20)) + [310, 311, 622, 623, 624, 625, 1247]:
        same_as_torch(probs_like(2, 777, skip, top_k=40), 11, skip)
    a, b = twins(5)  # a fresh seed: torch makes its first state on the first word
    assert torch.equal(torch.multinomial(probs_like(1, 3, 0), 1, generator=a), rows.multinomial(probs_like(1, 3, 0), b))


@needs
def test_flat_tiny_and_one_hot_rows():
    same_as_torch(torch.full((4, 1000), 1e-3), 1)               # ties broken by the variates alone
    hot = torch.zeros(3, 500)
    hot[0, 0], hot[1, 499], hot[2, 250] = 1, 1, 1
    a, b = twins(3)
    assert rows.multinomial(hot, b).flatten().tolist() == [0, 499, 250] == \
        torch.multinomial(hot, 1, generator=a).flatten().tolist()


@needs
def test_exponential_variates_bit_for_bit():
    """The variates themselves (not only the winner), over some 3M elements and ragged lengths."""
    a, b = twins(9, 3)
    for n in [1, 5, 8, 17, 623, 624, 625, 1249, 3_000_000]:
        assert torch.equal(rows.exponential(n, b), torch.empty(n).exponential_(generator=a)), n
        assert torch.equal(a.get_state(), b.get_state())


def crafted(words_at: int, p: torch.Tensor):
    """A generator whose next two raw words are 0 at element ``words_at`` (u = 0, q = 0: p / q is inf or NaN)."""
    g = torch.Generator().manual_seed(1)
    torch.rand(1, generator=g)  # make the first state: 624 words, one (or two) used
    state = g.get_state().clone()
    nxt = int.from_bytes(bytes(state[16:24].tolist()), "little")
    word = nxt + 2 * words_at
    assert word + 1 < 624
    for w in (word, word + 1):
        state[24 + 8 * w: 32 + 8 * w] = 0
    a, b = torch.Generator(), torch.Generator()
    a.set_state(state)
    b.set_state(state)
    return torch.multinomial(p, 1, generator=a), rows.multinomial(p, b), a, b


@needs
def test_a_zero_variate_is_drawn_as_torch_draws_it():
    dense = torch.rand(1, 100) + 0.1
    sparse = torch.zeros(1, 100)  # top-k like: the zero variate's whole block of 8 has p = 0
    sparse[0, 50] = 1.0
    for p, at, p_at in [(dense, 5, 0.0), (dense, 5, 0.3), (dense, 0, 0.0), (dense, 99, 0.0), (sparse, 21, 0.0),
                        (sparse, 70, 0.0), (sparse, 3, 0.2)]:
        q = p.clone()
        q[0, at] = p_at
        want, got, a, b = crafted(at, q)
        assert torch.equal(got, want), (at, p_at)                 # 0 / 0 is NaN and NaN wins; p / 0 is inf
        assert torch.equal(a.get_state(), b.get_state())


@needs
@pytest.mark.parametrize("bad", ["negative", "nan", "inf", "zero row"])
def test_bad_rows_raise_torch_s_error_and_draw_nothing(bad, flush):
    p = torch.rand(3, 40)
    p[1, 3] = {"negative": -0.5, "nan": float("nan"), "inf": float("inf"), "zero row": 0.0}[bad]
    if bad == "zero row":
        p[1] = 0
    a, b = twins(4)
    with pytest.raises(RuntimeError) as want:
        torch.multinomial(p, 1, generator=a)
    with pytest.raises(RuntimeError) as got:
        rows.multinomial(p, b)
    assert str(got.value) == str(want.value)
    assert torch.equal(a.get_state(), b.get_state())


def test_what_it_does_not_take_goes_to_torch():
    for probs in [probs_like(3, 50, 0).double(), probs_like(50, 3, 0).T, probs_like(5, 10, 0)[0]]:
        a, b = twins(2)
        assert torch.equal(rows.multinomial(probs, b), torch.multinomial(probs, 1, generator=a))
        assert torch.equal(a.get_state(), b.get_state())
    torch.manual_seed(8)  # generator=None: torch's default generator, advanced the same way
    want, after = torch.multinomial(probs_like(2, 999, 1, top_k=9), 1), torch.rand(3)
    torch.manual_seed(8)
    assert torch.equal(rows.multinomial(probs_like(2, 999, 1, top_k=9)), want) and torch.equal(torch.rand(3), after)


def test_a_draw_that_disagrees_with_torch_is_not_used(monkeypatch):
    monkeypatch.setattr(rows, "_state", dict(rows._state))
    rows._state.pop("draw", None)
    monkeypatch.setattr(rows, "_draw", lambda probs, g: torch.zeros(probs.shape[0], 1, dtype=torch.int64))
    assert rows._draw_agrees() is False
    assert "does not draw what torch" in rows._state["draw_why"] or rows._lib() is None
    probs = probs_like(4, 300, 3)
    a, b = twins(6)
    assert torch.equal(rows.multinomial(probs, b), torch.multinomial(probs, 1, generator=a))


@needs
def test_threads_draw_with_their_own_generators():
    probs = [probs_like(8, 4000 + 100 * i, i, top_k=50) for i in range(4)]  # each thread its own scratch size

    def draws(i, fn):
        g = torch.Generator().manual_seed(i)
        return torch.cat([fn(probs[i], g) for _ in range(5)])

    want = [draws(i, lambda p, g: torch.multinomial(p, 1, generator=g)) for i in range(4)]
    got = [None] * 4

    def work(i):
        got[i] = draws(i, rows.multinomial)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(w, g) for w, g in zip(want, got))


@pytest.mark.parametrize("settings", [dict(), dict(top_k=3), dict(top_p=0.8, temperature=0.7), dict(cfg_scale=2.0)])
def test_generate_draws_the_codes_torch_multinomial_drew(monkeypatch, settings):
    torch.manual_seed(0)
    model = Transformer(text_vocab=40, text_len=5, image_vocab=300, image_grid=(3, 3), n_layer=1, n_head=2,
                        d_model=16).eval()
    text = torch.randint(1, 40, (2, 5))
    ours = generate(model, text, 3, generator=torch.Generator().manual_seed(4), **settings)
    monkeypatch.setattr(rows, "multinomial", lambda p, g=None: torch.multinomial(p, 1, generator=g))
    theirs = generate(model, text, 3, generator=torch.Generator().manual_seed(4), **settings)
    assert torch.equal(ours, theirs)


@needs
def test_subnormal_probabilities_under_either_mode(flush):
    same_as_torch(torch.full((2, 300), 1e-40).index_fill_(1, torch.tensor([7]), 1e-30), 2)
    if not flush:
        same_as_torch(torch.full((2, 300), 1e-40), 2)           # every p subnormal (p / q may underflow)
    same_as_torch(probs_like(4, 2000, 1, scale=60.0), 3)       # peaked: subnormal tails from the softmax
    p = torch.full((1, 64), 1e-40)
    a, b = twins(1)
    if flush:  # every p flushes to 0: torch's error, and nothing drawn
        with pytest.raises(RuntimeError, match="sum of probabilities"):
            torch.multinomial(p, 1, generator=a)
        with pytest.raises(RuntimeError, match="sum of probabilities"):
            rows.multinomial(p, b)
    else:
        assert torch.equal(rows.multinomial(p, b), torch.multinomial(p, 1, generator=a))
    assert torch.equal(a.get_state(), b.get_state())


def torch_top_k(x, k):
    return x.masked_fill(x < x.topk(k, dim=-1).values[..., -1:], float("-inf"))


@needs
def test_top_k_filter_keeps_what_topk_keeps(flush):
    for seed in range(150):
        g = torch.Generator().manual_seed(seed)
        R, V = 1 + seed % 5, [2, 3, 16, 17, 100, 1000, 16384][seed % 7]
        x = torch.randn(R, V, generator=g) * [1.0, 10.0, 1e-30, 1e30][seed % 4]
        if seed % 5 == 0:
            x = x.round()                                      # ties at the k-th value
        if seed % 6 == 0:
            x[0, : V // 2] = float("-inf")
            x[-1, -1] = float("inf")
        if seed % 9 == 0:
            x[0, 0], x[0, 1] = 0.0, -0.0
        k = 1 + (seed * 7919) % (V - 1)
        got = rows.top_k_filter(x, k)
        if flush and seed % 4 == 2:
            continue                                           # subnormal logits under flushing: torch's call
        assert got is not None and torch.equal(got, torch_top_k(x, k)), (seed, R, V, k)


@needs
def test_top_k_filter_leaves_what_it_cannot_rank_to_torch(flush):
    x = torch.randn(3, 40)
    x[1, 5] = float("nan")
    assert rows.top_k_filter(x, 4) is None
    tiny = torch.randint(1, 1 << 23, (2, 40), dtype=torch.int32).view(torch.float32)  # subnormal, made bitwise
    assert (rows.top_k_filter(tiny, 4) is None) == flush
    assert rows.top_k_filter(torch.randn(3, 40).double(), 4) is None and rows.top_k_filter(torch.randn(40), 4) is None
    assert rows.top_k_filter(torch.randn(3, 40, requires_grad=True), 4) is None  # torch keeps the graph
    from t2i.sampling import filter_logits

    for logits in (x, tiny, torch.randn(2, 3, 50)):               # filter_logits: the same result either way
        torch.testing.assert_close(filter_logits(logits, 4), torch_top_k(logits, 4), rtol=0, atol=0, equal_nan=True)
