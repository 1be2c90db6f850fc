"""Quantizers: straight-through gradients, the legacy beta placement, EMA, dead-code restart, cosine and
low-dimensional lookup, Gumbel, codebook-usage statistics."""

from __future__ import annotations

import math

import pytest
import torch
from einops import rearrange

from t2i.models.quantizers import CodebookUsage, GumbelQuantizer, VectorQuantizer, codebook_usage


def as_map(vectors: torch.Tensor) -> torch.Tensor:
    """[N, C] vectors -> [1, C, 1, N] feature map (so codes come back as [1, 1, N])."""
    return rearrange(vectors, "(b h w) c -> b c h w", b=1, h=1)


def vq_with(codebook, **kw) -> VectorQuantizer:
    q = VectorQuantizer(codebook.shape[0], codebook.shape[1], **kw)
    with torch.no_grad():
        q.embedding.weight.copy_(codebook)
    return q


# 2 vectors, 3 codes: z0=(1,0) -> e0=(0.5,0); z1=(0,2) -> e2=(0,1.5); e1 is far away
Z = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
E = torch.tensor([[0.5, 0.0], [2.0, 2.0], [0.0, 1.5]])
ASSIGNED = E[[0, 2]]


def test_straight_through_gradient_is_identity():
    torch.manual_seed(0)
    q = VectorQuantizer(16, 8)
    z = torch.randn(2, 8, 3, 3, requires_grad=True)
    z_q, _, info = q(z)
    assert z_q.shape == z.shape and info["codes"].shape == (2, 3, 3) and info["codes"].dtype == torch.long
    g = torch.randn_like(z_q)
    (z_q * g).sum().backward()
    torch.testing.assert_close(z.grad, g)
    assert q.embedding.weight.grad is None  # the reconstruction path does not touch the codebook
    # forward value is the codebook vector itself
    torch.testing.assert_close(z_q, q.embed_codes(info["codes"]))


@pytest.mark.parametrize("legacy", [False, True])
def test_loss_matches_hand_computation(legacy):
    beta = 0.25
    q = vq_with(E, beta=beta, legacy=legacy)
    z = as_map(Z).requires_grad_(True)
    _, loss, info = q(z)
    assert info["codes"].flatten().tolist() == [0, 2]
    mse = ((Z - ASSIGNED) ** 2).mean()  # = 0.125; both terms have this value in the forward pass
    assert mse.item() == pytest.approx(0.125)
    torch.testing.assert_close(loss, (1 + beta) * mse)
    loss.backward()
    n = Z.numel()
    w_codebook, w_commit = (beta, 1.0) if legacy else (1.0, beta)
    # encoder gets only the commitment term, the codebook only the codebook term
    torch.testing.assert_close(z.grad, as_map(w_commit * 2 * (Z - ASSIGNED) / n))
    expected = torch.zeros_like(E)
    expected[[0, 2]] = w_codebook * 2 * (ASSIGNED - Z) / n
    torch.testing.assert_close(q.embedding.weight.grad, expected)


def test_legacy_scales_codebook_gradient_by_beta():
    grads = {}
    for legacy in (False, True):
        q = vq_with(E, beta=0.3, legacy=legacy)
        q(as_map(Z))[1].backward()
        grads[legacy] = q.embedding.weight.grad
    torch.testing.assert_close(grads[True], 0.3 * grads[False])


def test_ema_moves_codebook_to_assigned_means_in_training_only():
    torch.manual_seed(0)
    centers = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [5.0, -5.0]])
    q = vq_with(centers + 0.5, ema_decay=0.5)
    assert not q.embedding.weight.requires_grad
    data = torch.cat([centers[0] + 0.1 * torch.randn(20, 2), centers[1] + 0.1 * torch.randn(12, 2)])
    z = as_map(data)
    means = torch.stack([data[:20].mean(0), data[20:].mean(0)])

    q.eval()
    before = q.embedding.weight.clone()
    q(z)
    torch.testing.assert_close(q.embedding.weight, before)  # eval never updates

    q.train()
    dist0 = (q.embedding.weight[:2] - means).norm(dim=1)
    _, loss, info = q(z)
    assert info["codes"].flatten().tolist() == [0] * 20 + [1] * 12
    dist1 = (q.embedding.weight[:2] - means).norm(dim=1)
    assert (dist1 < dist0).all()
    torch.testing.assert_close(loss, 0.25 * info["commitment_loss"])  # commitment only
    for _ in range(30):
        q(z)
    torch.testing.assert_close(q.embedding.weight[:2], means, atol=1e-3, rtol=0)


def test_restart_dead_codes_from_batch_vectors():
    torch.manual_seed(0)
    codebook = torch.cat([torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.full((6, 2), 100.0)])
    q = vq_with(codebook, restart_dead=2)
    data = torch.randn(8, 2) * 0.1 + torch.tensor([1.0, 0.0])
    z = as_map(data)
    q.eval()
    q(z)
    q(z)
    assert q.unused_steps.sum() == 0  # eval does not count
    q.train()
    q(z)
    q(z)  # codes 2..7 now unused for 2 training forwards ...
    torch.testing.assert_close(q.embedding.weight, codebook)
    assert q.unused_steps.tolist() == [0, 2, 2, 2, 2, 2, 2, 2]
    q(z)  # ... so this forward restarts them (code 1 is unused for 2 forwards too)
    new = q.embedding.weight.detach()
    dead = [1, 2, 3, 4, 5, 6, 7]
    assert not torch.isclose(new[dead], codebook[dead]).all(dim=1).any()
    for row in new[dead]:
        assert (data == row).all(dim=1).any(), "restarted code is not a batch vector"
    assert len({tuple(r.tolist()) for r in new[dead]}) == len(dead)  # distinct vectors while the batch allows


def test_cosine_lookup_differs_from_euclidean():
    codebook = torch.tensor([[0.1, 0.1], [3.0, 2.0]])
    z = as_map(torch.tensor([[3.0, 3.0]]))
    assert vq_with(codebook).codes(z).item() == 1
    q = vq_with(codebook, l2_normalize=True)
    z_q, _, info = q(z)
    assert info["codes"].item() == 0
    torch.testing.assert_close(z_q.flatten(), torch.tensor([1.0, 1.0]) / math.sqrt(2))


def test_low_dimensional_lookup():
    torch.manual_seed(0)
    q = VectorQuantizer(32, 16, codebook_dim=4)
    assert q.embedding.weight.shape == (32, 4)
    z = torch.randn(2, 16, 4, 4, requires_grad=True)
    z_q, loss, info = q(z)
    assert z_q.shape == z.shape and info["codes"].shape == (2, 4, 4)
    low = q.proj_in(rearrange(z, "b c h w -> b h w c")).detach()
    expected = torch.cdist(low.reshape(-1, 4), q.embedding.weight.detach()).argmin(1)
    assert torch.equal(info["codes"].flatten(), expected)
    torch.testing.assert_close(z_q, q.embed_codes(info["codes"]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q.codes(z), info["codes"])
    (z_q.sum() + loss).backward()
    assert z.grad is not None and q.proj_in.weight.grad is not None and q.proj_out.weight.grad is not None


def test_gumbel_eval_argmax_and_kl():
    torch.manual_seed(0)
    q = GumbelQuantizer(8, 6, 10, kl_weight=1.0)
    z = torch.randn(2, 8, 3, 3)
    q.eval()
    z_q, _, info = q(z)
    logits = q.proj(z)
    assert torch.equal(info["codes"], logits.argmax(1))
    torch.testing.assert_close(z_q, rearrange(q.embed.weight[info["codes"]], "b h w d -> b d h w"))
    assert torch.equal(q.codes(z), info["codes"])

    with torch.no_grad():  # uniform logits -> KL to the uniform prior is 0
        q.proj.weight.zero_()
        q.proj.bias.zero_()
    assert q(z)[1].item() == pytest.approx(0.0, abs=1e-6)

    p = torch.softmax(torch.arange(10.0), 0)
    with torch.no_grad():
        q.proj.bias.copy_(p.log())
    expected = (p * (p * 10).log()).sum()
    assert q(z)[1].item() == pytest.approx(expected.item(), rel=1e-5)
    q.kl_weight = 5e-4
    assert q(z)[1].item() == pytest.approx(5e-4 * expected.item(), rel=1e-5)


def test_gumbel_training_is_hard_straight_through():
    torch.manual_seed(0)
    q = GumbelQuantizer(8, 6, 10).train()
    q.temperature = 0.5
    z = torch.randn(2, 8, 3, 3, requires_grad=True)
    z_q, loss, info = q(z)
    torch.testing.assert_close(z_q, q.embed_codes(info["codes"]))  # hard samples are codebook rows
    (z_q.sum() + loss).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0 and q.proj.weight.grad is not None


def test_codebook_usage_helpers():
    codes = torch.tensor([[0, 1], [1, 0]])
    perplexity, used = codebook_usage(codes, 4)
    assert perplexity.item() == pytest.approx(2.0) and used == 0.5
    metric = CodebookUsage(4)
    metric.update(codes)
    metric.update(torch.tensor([[2, 2, 2, 2]]))
    out = metric.compute()
    p = torch.tensor([2, 2, 4]) / 8
    assert out["perplexity"].item() == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    assert out["dead_codes"].item() == pytest.approx(0.25)
    metric.reset()
    assert metric.counts.sum() == 0
    assert VectorQuantizer(4, 2)(as_map(torch.zeros(3, 2)))[2]["perplexity"].item() == pytest.approx(1.0)


def test_bad_options():
    with pytest.raises(ValueError, match="ema_decay"):
        VectorQuantizer(4, 2, ema_decay=1.5)
    with pytest.raises(ValueError, match="restart_dead"):
        VectorQuantizer(4, 2, restart_dead=-1)
