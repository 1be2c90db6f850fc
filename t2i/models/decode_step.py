"""The blocks of a decode step (one new position per row) written out, for CPU inference.

:class:`DecodeStep` runs the same arithmetic as :meth:`t2i.models.transformer.Block.forward` over one
position, without ``nn.Module`` calls and with fewer, fused operations: each layer is a tuple of packed
linear functions (:func:`~t2i.models.attention.pack_linear`) and LayerNorm parameters. The residual adds run
inside the attention output and MLP output GEMMs (oneDNN's binary post-op), the GELU inside the MLP input
GEMM, and attention's ``1/sqrt(d)`` is folded into the query rows of the packed QKV weight; a layer's
attention (the cache write included) is one call of :func:`t2i.models.rows.step_attention` on AVX-512 CPUs,
else it reads the cache in place, in float32 (:func:`~t2i.models.attention.segment_attention`). The packed
layers are :mod:`t2i.models.rows`' own kernel where it runs, else oneDNN's. In float32 that is
the module path's arithmetic up to rounding; in bfloat16 the fused GEMMs round once where the module path
rounds twice (both stay equally close to the float32 model: ``tests/test_transformer_decode.py``).

Under CPU autocast to bfloat16 over float32 weights (``Pipeline(dtype="bf16")``) the step is built from
bfloat16 copies of the weights (made once: ``pack_linear`` keeps ``rows.c``'s copies with the model), and computes what autocast computes: bfloat16 GEMMs,
LayerNorm and the residual stream in float32; without it autocast would cast every weight on every step.

It covers the plain pre-LN block (no rotary positions, Sandwich-LN or PB-relax; those keep the module
path) and is used only where the module path would use the packed layers: no gradient, evaluation mode,
inputs in the weights' dtype, and autocast on in the dtype the step was built for or off.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from t2i.models import attention as A
from t2i.models import rows as rows_kernel


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

    def __init__(self, model, layers, fused: bool, autocast: torch.dtype | None = None):
        self.model, self.layers, self.fused, self.autocast = model, layers, fused, autocast
        self.dtype = next(model.parameters()).dtype
        # attention, the cache write included, in one call of t2i.models.rows where it runs this dtype
        self.kernel = rows_kernel.available(autocast or self.dtype) and model.seq_len <= rows_kernel.MAX_KEYS

    @classmethod
    def build(cls, model, batch: int, autocast: torch.dtype | None = None):
        """``autocast``: the autocast dtype the step will run under (bfloat16 over float32 weights), or None."""
        if not supports(model):
            return None
        dtype = next(model.parameters()).dtype
        compute = autocast or dtype
        fused = torch.backends.mkldnn.is_available() and \
            (compute == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported())
        residual = fused and autocast is None  # under autocast the residual stream stays float32: a separate add
        d, hd = model.blocks[0].attn.qkv.in_features, model.head_dim
        scale = hd ** -0.5
        exact = math.log2(hd) % 1 == 0  # a power-of-two head size: the folded scale is exact
        layers = []
        for b in model.blocks:
            if fused:
                qkv = A.pack_linear(b.attn.qkv, batch, scale_rows=d if exact else 0, scale=scale, dtype=compute)
                proj = A.pack_linear(b.attn.proj, batch, residual=residual, dtype=compute)
                fc = A.pack_linear(b.mlp.fc, batch, gelu=b.mlp.approximate, dtype=compute)
                fc2 = A.pack_linear(b.mlp.proj, batch, residual=residual, dtype=compute)
            else:
                qkv, proj, fc, fc2 = (A.pack_linear(m, batch, dtype=compute)
                                      for m in (b.attn.qkv, b.attn.proj, b.mlp.fc, b.mlp.proj))
            if None in (qkv, proj, fc, fc2):
                return None
            layers.append((b.ln_1, b.ln_2, qkv, proj, fc, fc2, b.mlp.approximate, b.attn.impl,
                           1.0 if fused and exact else scale))
        return cls(model, layers, fused, autocast)

    def usable(self, x: torch.Tensor) -> bool:
        if torch.is_grad_enabled() or self.model.training or x.dtype != self.dtype:
            return False
        on = torch.is_autocast_enabled(x.device.type)
        if self.autocast is None:
            return not on
        return on and torch.get_autocast_dtype(x.device.type) == self.autocast

    def __call__(self, x: torch.Tensor, start: int, cache, caption: bool = False) -> torch.Tensor:
        m = self.model
        B, H, hd = x.shape[0], m.n_head, m.head_dim
        d = H * hd
        end = start + 1
        c = self.autocast or x.dtype  # the GEMMs' dtype
        for i, (ln1, ln2, qkv, proj, fc, fc2, gelu, impl, scale) in enumerate(self.layers):
            h = F.layer_norm(x, (d,), ln1.weight, ln1.bias, ln1.eps)
            qkv_ = qkv(h.to(c))
            kc, vc = cache.k[i], cache.v[i]
            if self.kernel and kc.dtype == c and kc.is_contiguous() and vc.is_contiguous():
                y = rows_kernel.step_attention(qkv_, kc, vc, start, m.step_index(i, start, caption), scale)
            else:
                qkv_ = qkv_.view(B, 3, H, hd)
                kc[:, :, start] = qkv_[:, 1]
                vc[:, :, start] = qkv_[:, 2]
                q = qkv_[:, 0, :, None]  # [B, H, 1, hd]
                keys = m.step_keys(i, start, caption)
                y = A.step_attention(q, kc[:, :, :end], vc[:, :, :end], keys, m.mask(i, caption)[start:end, :end],
                                     impl, scale=scale)
                y = y.transpose(1, 2).reshape(B, 1, d).to(c)
            if not self.fused:
                x = x + proj(y)
                h = F.layer_norm(x, (d,), ln2.weight, ln2.bias, ln2.eps)
                x = x + fc2(F.gelu(fc(h.to(c)), approximate=gelu))
            elif self.autocast is None:
                x = proj(y, x)
                x = fc2(fc(F.layer_norm(x, (d,), ln2.weight, ln2.bias, ln2.eps)), x)
            else:  # float32 residual stream and LayerNorm, bfloat16 GEMMs (as autocast)
                x = x + proj(y)
                x = x + fc2(fc(F.layer_norm(x, (d,), ln2.weight, ln2.bias, ln2.eps).to(c)))
        return x
