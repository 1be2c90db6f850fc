"""t2i.models.rows: the few-rows linear kernel (rows.c) against F.linear, its fallbacks and its build cache."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from t2i.models import rows
from t2i.models.attention import pack_linear

needs = pytest.mark.skipif(not rows.available(), reason=f"rows kernel unavailable: {rows.why_not()}")
needs_bf16 = pytest.mark.skipif(not rows.available(torch.bfloat16), reason="no AVX512-BF16 rows kernel here")


@needs
@pytest.mark.parametrize("M, K, N", [(1, 16, 48), (3, 37, 50), (8, 768, 2304), (11, 130, 97), (32, 64, 200)])
@pytest.mark.parametrize("bias, residual", [(True, False), (False, False), (True, True)])
def test_float32_rows_match_f_linear(M, K, N, bias, residual):
    torch.manual_seed(M * 7 + K)
    w, b = torch.randn(N, K) * 0.1, (torch.randn(N) if bias else None)
    x, r = torch.randn(M, 1, K), torch.randn(M, 1, N)
    f = rows.linear_fn(w, b, residual)
    ref = F.linear(x.double(), w.double(), b.double() if b is not None else None) + (r.double() if residual else 0)
    y = f(x, r) if residual else f(x)
    assert y.shape == (M, 1, N) and y.dtype == torch.float32
    assert (y.double() - ref).abs().max() <= 1e-5 * max(1.0, float(ref.abs().max()))


@needs_bf16
@pytest.mark.parametrize("M, K, N", [(1, 32, 48), (8, 33, 50), (8, 768, 3072), (13, 96, 130)])
def test_bfloat16_rows_round_the_float32_sum_once(M, K, N):
    torch.manual_seed(K)
    w, b = (torch.randn(N, K) * 0.1).bfloat16(), torch.randn(N).bfloat16()
    x, r = torch.randn(M, K).bfloat16(), torch.randn(M, N).bfloat16()
    y = rows.linear_fn(w, b, residual=True)(x, r)
    exact = x.double() @ w.double().T + b.double() + r.double()
    assert y.dtype == torch.bfloat16
    # float32 accumulation, then one rounding to bfloat16 (8 significant bits): within one bfloat16 step
    assert ((y.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-4).all()


@needs
def test_pack_linear_takes_the_kernel_and_keeps_fusions():
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 96)
    x, r = torch.randn(8, 1, 64), torch.randn(8, 1, 96)
    with torch.no_grad():
        ref = layer(x)
        cases = [(pack_linear(layer, 8), (x,), ref), (pack_linear(layer, 8, residual=True), (x, r), ref + r),
                 (pack_linear(layer, 8, gelu="tanh"), (x,), F.gelu(ref, approximate="tanh")),
                 (pack_linear(layer, 8, scale_rows=32, scale=0.125), (x,),
                  torch.cat([ref[..., :32] * 0.125, ref[..., 32:]], -1))]
        for fn, args, want in cases:
            got = fn(*args)
            assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


@needs
def test_wrong_input_is_an_error_not_a_bad_read():
    f = rows.linear_fn(torch.randn(48, 16), None)
    with pytest.raises(ValueError, match=r"float32 \[48, 16\] weight got a torch.float64 \[2, 16\]"):
        f(torch.randn(2, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"got a torch.float32 \[2, 17\]"):
        f(torch.randn(2, 17))


def run(code, **env):
    base = {k: v for k, v in os.environ.items() if k != "T2I_ROWS"}  # a suite run with T2I_ROWS=0 tests these too
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**base, **env},
                          timeout=300)


def test_turned_off_falls_back_to_the_library_gemm():
    res = run("import torch\nfrom t2i.models import rows\nfrom t2i.models.attention import pack_linear\n"
              "l = torch.nn.Linear(16, 8)\nf = pack_linear(l, 8)\nx = torch.randn(8, 16)\n"
              "print(rows.available(), '|', rows.why_not(), '|', f is not None and "
              "bool(torch.allclose(f(x), l(x).detach(), atol=1e-6)))", T2I_ROWS="0")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False | turned off (T2I_ROWS=0) | True"


@needs
def test_the_build_is_cached_and_shared(tmp_path):
    code = "import torch\nfrom t2i.models import rows\nprint(rows.available(), rows.why_not())"
    first = run(code, T2I_KERNELS=str(tmp_path))
    made = sorted(p.name for p in tmp_path.iterdir())
    second = run(code, T2I_KERNELS=str(tmp_path))
    assert first.stdout.strip() == second.stdout.strip() == "True"
    assert len(made) == 1 and made[0].startswith("rows-") and made[0].endswith(".so")
    assert sorted(p.name for p in tmp_path.iterdir()) == made      # the second process compiled nothing


def test_no_compiler_is_a_reason_not_a_crash(tmp_path):
    res = run("import torch\nfrom t2i.models import rows\nprint(rows.available(), '|', rows.why_not())",
              T2I_KERNELS=str(tmp_path), CC=str(tmp_path / "no-such-cc"))
    assert res.returncode == 0, res.stderr
    out = res.stdout.strip()
    assert out.startswith("False | ") and ("no-such-cc" in out or "lacks" in out or "not x86-64" in out)
    assert not any(tmp_path.iterdir())                              # no half-written file left behind


@needs
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B, H, D, L, start, keep", [(8, 12, 64, 288, 150, "row"), (2, 3, 4, 40, 39, "all"),
                                                     (3, 2, 20, 50, 0, "all"), (1, 4, 64, 300, 299, "every7")])
def test_step_attention_matches_the_softmax_of_the_written_cache(dtype, B, H, D, L, start, keep):
    from t2i.models.attention import math_attention

    if dtype == torch.bfloat16 and not rows.available(torch.bfloat16):
        pytest.skip("no AVX512-BF16 rows kernel here")
    torch.manual_seed(D + start)
    k, v = torch.randn(B, H, L, D).to(dtype), torch.randn(B, H, L, D).to(dtype)
    qkv = torch.randn(B, 1, 3 * H * D).to(dtype)
    pos = torch.arange(start + 1)
    idx = {"all": pos, "row": torch.cat([pos[:32], pos[start - 16:]]), "every7": pos[pos % 7 == start % 7]}[keep]
    k0, v0 = k.clone(), v.clone()
    y = rows.step_attention(qkv, k, v, start, idx, D ** -0.5)
    q, kn, vn = qkv.view(B, 3, H, D).unbind(1)
    assert torch.equal(k[:, :, start], kn) and torch.equal(v[:, :, start], vn)      # the cache write
    k0[:, :, start], v0[:, :, start] = kn, vn
    assert torch.equal(torch.cat([k[:, :, :start], k[:, :, start + 1:]], 2),
                       torch.cat([k0[:, :, :start], k0[:, :, start + 1:]], 2))       # nothing else written
    want = math_attention(q.float()[:, :, None], k0[:, :, idx].float(), v0[:, :, idx].float())
    want = want.transpose(1, 2).reshape(B, 1, H * D)
    assert y.dtype == dtype and y.shape == (B, 1, H * D)
    tol = 2e-6 if dtype == torch.float32 else 2 ** -8
    assert ((y.float() - want).abs() <= tol * (1 + want.abs())).all(), (y.float() - want).abs().max()


@needs
def test_step_attention_refuses_what_it_cannot_read():
    k = torch.zeros(1, 2, 8, 4)
    with pytest.raises(ValueError, match="step_attention"):
        rows.step_attention(torch.zeros(1, 1, 24, dtype=torch.float64), k, k.clone(), 3, torch.arange(4), 0.5)
    with pytest.raises(ValueError, match="step_attention"):
        rows.step_attention(torch.zeros(1, 1, 24), k, k.clone(), 8, torch.arange(4), 0.5)   # start outside the cache


@needs
@pytest.mark.parametrize("gelu", ["none", "tanh"])
def test_fused_gelu_is_f_gelu_of_the_float32_sum(gelu):
    torch.manual_seed(3)
    w, b = torch.randn(100, 70), torch.randn(100)          # pre-activations spread over about +-25
    x = torch.randn(8, 70)
    pre = F.linear(x.double(), w.double(), b.double())
    y = rows.linear_fn(w, b, gelu=gelu)(x)
    assert (y.double() - F.gelu(pre, approximate=gelu)).abs().max() <= 1e-5
    if rows.available(torch.bfloat16):
        wb, bb, xb = w.bfloat16(), b.bfloat16(), x.bfloat16()
        exact = F.gelu(F.linear(xb.double(), wb.double(), bb.double()), approximate=gelu)
        yb = rows.linear_fn(wb, bb, gelu=gelu)(xb)
        assert ((yb.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-4).all()   # rounded once


@needs
@pytest.mark.parametrize("attention", ["dalle", "full"])
def test_decode_step_with_and_without_the_kernels_agrees(attention):
    """DecodeStep's two attention paths (rows.step_attention; PyTorch over cache views) and the two GEMM paths
    (rows.c; oneDNN) give the same float32 logits, step after step, over the same cache contents."""
    from t2i.models.transformer import Transformer

    torch.manual_seed(0)
    m = Transformer(text_vocab=50, text_len=6, image_vocab=64, image_grid=(4, 4), n_layer=4, n_head=4, d_model=64,
                    attention=attention, conv_kernel=3).eval()
    text = torch.randint(1, 50, (3, 6))
    codes = torch.randint(0, 64, (3, 16))
    with torch.no_grad():
        runs = []
        for kernels in (True, False):
            if not kernels:
                saved = rows._state.copy()
                rows._state.update(lib=None, why="off for this test", bf16=False)
            try:
                cache = m.new_cache(3, "cpu")
                assert cache.step is not None and cache.step.kernel is kernels
                out = [m.prefill(text, cache)]
                out += [m.decode_step(codes[:, i], i, cache) for i in range(15)]
                runs.append(torch.stack(out))
            finally:
                if not kernels:
                    rows._state.clear()
                    rows._state.update(saved)
        assert torch.allclose(runs[0], runs[1], atol=1e-5), (runs[0] - runs[1]).abs().max()
