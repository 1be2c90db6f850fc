"""The blocks of a decode step (one new position per row) written out, for CPU inference.

:class:`DecodeStep` runs the same arithmetic as :meth:`t2i.models.transformer.Block.forward` over one
position, without ``nn.Module`` calls and with fewer, fused operations: each layer is a tuple of packed
linear functions (:func:`~t2i.models.attention.pack_linear`) and LayerNorm parameters. In float32 the
residual adds run inside the attention output and MLP output GEMMs (oneDNN's binary post-op), the GELU
inside the MLP input GEMM, and attention's ``1/sqrt(d)`` is folded into the query rows of the packed QKV
weight; attention reads the cache in place (:func:`~t2i.models.attention.key_segments`). In bfloat16 every
operation rounds where the module path rounds (separate adds, the GELU after the rounded GEMM, the same
attention kernel on the same gathered keys), so cached sampling still draws the codes uncached sampling
draws.

It covers the plain pre-LN block (no rotary positions, Sandwich-LN or PB-relax; those keep the module
path) and is used only where the module path would use the packed layers: no gradient, no autocast,
evaluation mode, inputs in the weights' dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from t2i.models import attention as A


def supports(model) -> bool:
    """Can :class:`DecodeStep` run ``model``'s blocks (a :class:`~t2i.models.transformer.Transformer`)?"""
    b = model.blocks[0]
    return not model.rotary and not b.pb_relax and isinstance(b.ln_attn_out, torch.nn.Identity) and \
        next(model.parameters()).device.type == "cpu"


class DecodeStep:
    """``step(x, start, cache, caption)``: ``x [B, 1, d]`` (the embedded token at ``start``) through every
    block, its keys and values written into ``cache``; returns the last block's output (before ``ln_f``).
    ``DecodeStep.build`` returns None where the packed layers cannot be made (see :func:`supports`). The
    cache holds its step, not the other way round, so a cache and its packed weights are freed as soon as
    the last reference to the cache goes."""

    def __init__(self, model, layers, fused: bool):
        self.model, self.layers, self.fused = model, layers, fused
        self.dtype = next(model.parameters()).dtype

    @classmethod
    def build(cls, model, batch: int):
        if not supports(model):
            return None
        dtype = next(model.parameters()).dtype
        fused = torch.backends.mkldnn.is_available() and \
            (dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported())
        d, hd = model.blocks[0].attn.qkv.in_features, model.head_dim
        scale = hd ** -0.5
        exact = math.log2(hd) % 1 == 0  # a power-of-two head size: the folded scale is exact
        layers = []
        for b in model.blocks:
            if fused:
                qkv = A.pack_linear(b.attn.qkv, batch, scale_rows=d if exact else 0, scale=scale)
                proj = A.pack_linear(b.attn.proj, batch, residual=True)
                fc = A.pack_linear(b.mlp.fc, batch, gelu=b.mlp.approximate)
                fc2 = A.pack_linear(b.mlp.proj, batch, residual=True)
            else:
                qkv, proj, fc, fc2 = (A.pack_linear(m, batch) for m in (b.attn.qkv, b.attn.proj, b.mlp.fc, b.mlp.proj))
            if None in (qkv, proj, fc, fc2):
                return None
            layers.append((b.ln_1, b.ln_2, qkv, proj, fc, fc2, b.mlp.approximate, b.attn.impl,
                           1.0 if fused and exact else scale))
        return cls(model, layers, fused)

    def usable(self, x: torch.Tensor) -> bool:
        return not torch.is_grad_enabled() and not self.model.training and x.dtype == self.dtype and \
            not torch.is_autocast_enabled(x.device.type)

    def __call__(self, x: torch.Tensor, start: int, cache, caption: bool = False) -> torch.Tensor:
        m = self.model
        B, H, hd = x.shape[0], m.n_head, m.head_dim
        d = H * hd
        end = start + 1
        for i, (ln1, ln2, qkv, proj, fc, fc2, gelu, impl, scale) in enumerate(self.layers):
            h = F.layer_norm(x, (d,), ln1.weight, ln1.bias, ln1.eps)
            qkv_ = qkv(h).view(B, 3, H, hd)
            kc, vc = cache.k[i], cache.v[i]
            kc[:, :, start] = qkv_[:, 1]
            vc[:, :, start] = qkv_[:, 2]
            q = qkv_[:, 0, :, None]  # [B, H, 1, hd]
            keys = m.step_keys(i, start, caption)
            y = A.step_attention(q, kc[:, :, :end], vc[:, :, :end], keys, m.mask(i, caption)[start:end, :end], impl,
                                 scale=scale)
            if self.fused:
                x = proj(y.transpose(1, 2).reshape(B, 1, d), x)
                x = fc2(fc(F.layer_norm(x, (d,), ln2.weight, ln2.bias, ln2.eps)), x)
                continue
            x = x + proj(y.transpose(1, 2).reshape(B, 1, d))
            h = F.layer_norm(x, (d,), ln2.weight, ln2.bias, ln2.eps)
            x = x + fc2(F.gelu(fc(h), approximate=gelu))
        return x
