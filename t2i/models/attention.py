"""Attention patterns over ``[text ; image]`` sequences (DALL·E / Sparse Transformer) and the attention layer.

A sequence holds ``text_len`` text tokens, then the ``h x w`` image grid in raster order. Every text
token attends causally to earlier text; every image token attends to all text and, among image tokens
``j`` at or before it in raster order, to those its pattern allows (image token ``i`` at raster index
``r``, row ``y``, column ``x``; grid width ``w``):

- ``full``: all of them;
- ``row``: ``r(i) - r(j) <= w`` (itself and the previous ``w`` positions, so the token above is in);
- ``column``: ``x(j) == x(i)``;
- ``conv``: ``|y(i) - y(j)| <= k // 2`` and ``|x(i) - x(j)| <= k // 2`` (kernel ``k``);
- ``axial_row``: ``y(j) == y(i)`` (DALLE-pytorch's reading of row attention).

``model.attention`` is one pattern name for every layer, a schedule name (``full``, ``dalle``: column
attention on layers ``i`` with ``(i - 2) % 4 == 0`` counting from 1, row on the others, conv on the
last), or an explicit list with one name per layer.

:class:`Attention` runs a layer through ``scaled_dot_product_attention`` with a boolean mask
(``attn_impl=sdpa``, exact, the default), through :func:`math_attention` (``attn_impl=math``: explicit
matmul / softmax, the fast one for bf16 training of short sequences on CPU, where PyTorch's flash
kernel's backward is 3x slower; see ``experiments/attention_cpu``) or FlexAttention block masks
(``attn_impl=flex``: sparse layers skip fully masked blocks on GPU and compiled CPU). Incremental
decoding always uses the mask rows of the new positions against the cached keys, so every pattern
is cached; a decode step (one new position) reads only the keys its mask row allows and runs
:func:`segment_attention` over views of the cache (:func:`key_segments`: one row of scores in float32, no
gathered copy). SDPA's tiled CPU kernel costs more than it saves there: in bfloat16 it takes 5x float32's
time for one query row (``experiments/transformer_speed/README.md``).
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from t2i.errors import ConfigError
from t2i.models import rows as rows_kernel

ROWS_KERNEL_MAX = 32  # pack_linear uses t2i.models.rows up to this many rows (oneDNN above: compute-bound there)
# rows.c's packed copies, kept with their layer between caches: layer -> (stamp of its weight and bias, {args: fn})
_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
PATTERNS = ("full", "row", "column", "conv", "axial_row")
SCHEDULES = ("full", "dalle")
IMPLS = ("sdpa", "math", "flex")


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                   dropout_p: float = 0.0) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d)) v`` written out: the two matmuls run in the inputs' dtype, the masked
    softmax in float32. ``mask`` is boolean (True: attend), broadcastable to ``[B, H, Tq, Tk]``. Same
    result as ``scaled_dot_product_attention``; it materialises the scores, so it is for short sequences."""
    scores = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).float()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    att = scores.softmax(-1)
    if dropout_p > 0:
        att = F.dropout(att, p=dropout_p)
    return att.to(v.dtype) @ v


def key_segments(row: torch.Tensor, most: int = 2) -> tuple | None:
    """The cache positions a decode step's mask ``row`` (bool ``[position + 1]``) lets it attend to, as
    pieces of the cache to read: up to ``most`` slices (a run of positions with one stride: the text, the
    last ``w + 1`` positions of a row pattern, every ``w``-th of a column pattern), then one index tensor
    with whatever is left (the rows of a conv window after its first). None where the row allows every
    position. Slices are views of the cache, so a step reads only those keys and copies nothing."""
    if bool(row.all()):
        return None
    idx = row.nonzero()[:, 0].tolist()
    pieces, i = [], 0
    while i < len(idx) and len(pieces) < most:
        step = idx[i + 1] - idx[i] if i + 1 < len(idx) else 1
        j = i + 1
        while j < len(idx) and idx[j] - idx[j - 1] == step:
            j += 1
        pieces.append(slice(idx[i], idx[j - 1] + 1, step))
        i = j
    if i < len(idx):
        pieces.append(torch.tensor(idx[i:], device=row.device))
    return tuple(pieces)


def read_keys(k: torch.Tensor, piece) -> torch.Tensor:
    """The positions ``piece`` (a slice: a view; an index tensor: a copy) of ``k [B, H, L, d]``."""
    return k[:, :, piece] if isinstance(piece, slice) else k.index_select(2, piece)


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pieces, scale: float | None = None
                      ) -> torch.Tensor:
    """:func:`math_attention` of a decode step over the cache positions ``pieces`` (:func:`key_segments`),
    read piece by piece and computed in float32 (other dtypes are read into float32 piece by piece; the
    result is in ``v``'s dtype): the scores of every piece join in one softmax, and each piece's values
    are weighted in place, so no gathered copy of the keys is made. ``scale`` multiplies the queries
    (default ``1/sqrt(d)``; 1: already scaled)."""
    with torch.autocast(q.device.type, enabled=False):  # float32 math under autocast too
        return _segment_attention(q, k, v, pieces, scale)


def _segment_attention(q, k, v, pieces, scale):
    dtype = v.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q = q.float()
    if scale != 1.0:
        q = q * scale
    ks = [read_keys(k, p).float() for p in pieces]
    scores = torch.cat([q @ kk.transpose(-2, -1) for kk in ks], -1) if len(ks) > 1 else q @ ks[0].transpose(-2, -1)
    att = scores.softmax(-1)
    out, at = None, 0
    for p, kk in zip(pieces, ks):
        n = kk.shape[2]
        part = att[..., at:at + n] @ read_keys(v, p).float()
        out, at = (part if out is None else out + part), at + n
    return out.to(dtype)


def step_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys, mask: torch.Tensor, impl: str = "sdpa",
                   dropout_p: float = 0.0, scale: float | None = None) -> torch.Tensor:
    """A decode step's attention (one query row) over the cache ``k, v [B, H, end, d]``: ``keys`` the step's
    :func:`key_segments` (None: every position), ``mask`` its mask row ``[1, end]``. On a CPU and on float32
    anywhere: :func:`segment_attention` over views of the cache (``scale`` as there), in float32 whatever
    the cache's dtype. With dropout, and for half precision on a GPU (whose SDPA kernels handle one query
    row well), those keys are gathered and the layer's own kernel runs (:func:`attend`)."""
    if dropout_p == 0.0 and (q.dtype == torch.float32 or q.device.type == "cpu"):
        return segment_attention(q, k, v, keys or (slice(None),), scale)
    if keys is not None:
        k, v = (torch.cat([read_keys(x, piece) for piece in keys], 2) for x in (k, v))
        mask = None
    if scale is not None and scale != q.shape[-1] ** -0.5:
        q = q * (scale * q.shape[-1] ** 0.5)  # attend applies 1/sqrt(d) itself
    return attend(q, k, v, mask, dropout_p, impl)


def attend(q, k, v, mask=None, dropout_p: float = 0.0, impl: str = "sdpa") -> torch.Tensor:
    """Dense attention: ``impl="math"`` is :func:`math_attention`, anything else ``scaled_dot_product_attention``
    (a ``flex`` layer's dense path: cached decoding)."""
    if impl == "math":
        return math_attention(q, k, v, mask, dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def image_mask(pattern: str, h: int, w: int, kernel: int = 11) -> torch.Tensor:
    """``[h*w, h*w]`` bool: may image token ``i`` (row) attend to image token ``j`` (column)?"""
    r = torch.arange(h * w)
    y, x = r // w, r % w
    ri, rj = r[:, None], r[None, :]
    causal = rj <= ri
    if pattern == "full":
        allowed = torch.ones_like(causal)
    elif pattern == "row":
        allowed = ri - rj <= w
    elif pattern == "column":
        allowed = x[:, None] == x[None, :]
    elif pattern == "conv":
        half = kernel // 2
        allowed = ((y[:, None] - y[None, :]).abs() <= half) & ((x[:, None] - x[None, :]).abs() <= half)
    elif pattern == "axial_row":
        allowed = y[:, None] == y[None, :]
    else:
        raise ConfigError(f"attention pattern {pattern!r} is unknown; use one of {list(PATTERNS)}")
    return causal & allowed


def sequence_mask(pattern: str, text_len: int, h: int, w: int, kernel: int = 11) -> torch.Tensor:
    """``[L, L]`` bool over the whole ``[text ; image]`` sequence (``L = text_len + h*w``); True = attend."""
    n = h * w
    mask = torch.zeros(text_len + n, text_len + n, dtype=torch.bool)
    mask[:text_len, :text_len] = torch.ones(text_len, text_len, dtype=torch.bool).tril()
    mask[text_len:, :text_len] = True
    mask[text_len:, text_len:] = image_mask(pattern, h, w, kernel)
    return mask


def caption_mask(pattern: str, text_len: int, h: int, w: int, kernel: int = 11) -> torch.Tensor:
    """The image -> text (captioning) sequence ``[image ; text]``: image tokens attend among themselves with
    the pattern (as they do after the text in :func:`sequence_mask`), text tokens see every image token and
    the earlier text."""
    n = h * w
    mask = torch.zeros(n + text_len, n + text_len, dtype=torch.bool)
    mask[:n, :n] = image_mask(pattern, h, w, kernel)
    mask[n:, :n] = True
    mask[n:, n:] = torch.ones(text_len, text_len, dtype=torch.bool).tril()
    return mask


def layer_patterns(attention, n_layer: int) -> list[str]:
    """The pattern of each layer from ``model.attention`` (a pattern, a schedule or a per-layer list)."""
    if isinstance(attention, str):
        if attention == "dalle":
            names = ["row" if (i - 2) % 4 else "column" for i in range(1, n_layer + 1)]
            names[-1] = "conv"
            return names
        if attention in PATTERNS:
            return [attention] * n_layer
        raise ConfigError(f"model.attention={attention!r} is unknown; use a pattern {list(PATTERNS)}, "
                          f"a schedule {list(SCHEDULES)} or a list with one pattern per layer")
    names = [str(a) for a in attention]
    if len(names) != n_layer:
        raise ConfigError(f"model.attention lists {len(names)} patterns for {n_layer} layers (model.n_layer)")
    bad = [a for a in names if a not in PATTERNS]
    if bad:
        raise ConfigError(f"model.attention: unknown pattern(s) {bad}; use {list(PATTERNS)}")
    return names


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs of channels of ``x [B, H, t, d]`` by the angles behind ``cos``/``sin`` ``[t, d/2]``."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.type_as(x)


def rotary_angles(text_len: int, h: int, w: int, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """``[L, head_dim/2]`` angles of a 2-D rotary embedding: half of the channel pairs turn with the row,
    half with the column. Text token ``p`` sits at row = column = ``p``; image token ``(y, x)`` at row
    ``text_len + y``, column ``text_len + x``, so text alone is plain 1-D RoPE."""
    if head_dim % 4:
        raise ConfigError(f"model.rotary needs a head size (d_model / n_head = {head_dim}) divisible by 4")
    quarter = head_dim // 4
    freqs = base ** (-torch.arange(quarter, dtype=torch.float32) / quarter)
    t = torch.arange(text_len, dtype=torch.float32)
    y = torch.arange(h, dtype=torch.float32).repeat_interleave(w) + text_len
    x = torch.arange(w, dtype=torch.float32).repeat(h) + text_len
    rows, cols = torch.cat([t, y]), torch.cat([t, x])
    return torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=-1)


class KVCache:
    """Keys and values of every layer for positions ``[0, length)``, preallocated to the full sequence.

    ``packed`` maps ``(layer, gelu)`` -- a model's ``nn.Linear`` layer and the GELU fused after it, or None
    -- to a decode-step version of it (:func:`pack_linear`), made once for this cache's batch by
    :meth:`t2i.models.transformer.Transformer.new_cache`; ``step`` the written-out decode step it made
    (:class:`t2i.models.decode_step.DecodeStep`), or None; ``autocast`` the autocast dtype (bfloat16) both
    were made for when ``new_cache`` ran under CPU autocast over float32 weights, else None."""

    def __init__(self, n_layer: int, batch: int, n_head: int, max_len: int, head_dim: int, device, dtype):
        shape = (batch, n_head, max_len, head_dim)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.packed: dict = {}
        self.step = None  # a DecodeStep (t2i.models.decode_step) where the model's blocks have one
        self.autocast = None  # the autocast dtype the packed copies were made in (None: the weights' own)

    def autocast_on(self, x: torch.Tensor) -> torch.dtype | None:
        """The dtype the packed copies compute in, if they were made under autocast and that autocast is on
        now for ``x``'s device, else None."""
        if self.autocast is None or not torch.is_autocast_enabled(x.device.type) or \
                torch.get_autocast_dtype(x.device.type) != self.autocast:
            return None
        return self.autocast

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (e.g. to repeat a prefilled prompt for several samples)."""
        self.k = [k.index_select(0, index) for k in self.k]
        self.v = [v.index_select(0, index) for v in self.v]


def pack_linear(layer: nn.Linear, rows: int, gelu: str | None = None, residual: bool = False, scale_rows: int = 0,
                scale: float = 1.0, dtype: torch.dtype | None = None):
    """``layer`` as a function for inputs of ``rows`` rows (a decode step), its weight copied once into the
    blocked layout of oneDNN (float32 and bfloat16) or, where oneDNN cannot, MKL (float32) on CPU; None
    where neither applies. ``dtype``: the copy in that dtype (bfloat16 for a float32 layer under
    autocast, which would cast the weight on every call; inputs must then come in that dtype). oneDNN
    only: ``gelu`` (``"none"``: exact, ``"tanh"``) fuses ``F.gelu`` after it, on the float32 accumulator (in bfloat16 the output is rounded once, after the GELU, where
    ``F.gelu(layer(x))`` rounds before and after it); ``residual`` makes it ``f(x, r) = layer(x) + r`` in one
    call (likewise one rounding). ``scale_rows``/``scale``: the first ``scale_rows`` outputs multiplied by
    ``scale`` (folded into the packed copy: attention's ``1/sqrt(d)`` on the queries; exact when ``scale`` is
    a power of two).

    ``F.linear`` reads the weight in its stored ``[out, in]`` layout on every call, which at a few rows
    streams it at a third to a half of the machine's memory bandwidth; the packed copy streams it
    contiguously (``experiments/transformer_speed/RESULTS_roofline.md``: on an AMD EPYC, MKL's packed
    float32 GEMM reads 8 GB/s where oneDNN's reads 16-25). Same values as ``layer(x)`` up to float rounding."""
    w, b = layer.weight.detach(), layer.bias
    if dtype is not None and dtype != w.dtype:
        w, b = w.to(dtype), (b.detach().to(dtype) if b is not None else None)
    if w.device.type != "cpu" or w.dim() != 2 or w.dtype not in (torch.float32, torch.bfloat16):
        return None
    onednn = torch.backends.mkldnn.is_available() and \
        (w.dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported())
    ours = rows_kernel.available(w.dtype) and (rows >= 2 or w.dtype == torch.bfloat16) and rows <= ROWS_KERNEL_MAX
    if ours:  # the same copy for any rows it takes: kept with the layer while its bytes stay the same
        args, stamp = (gelu, residual, scale_rows, scale, w.dtype), _stamp(layer)
        kept = _KEPT.get(layer)
        if stamp is not None and kept is not None and kept[0] == stamp and args in kept[1]:
            return kept[1][args]
    if not (onednn or ours) and (gelu is not None or residual or scale_rows):
        return None
    if scale_rows:
        w, b = w.clone(), (b.detach().clone() if b is not None else None)
        w[:scale_rows] *= scale
        if b is not None:
            b[:scale_rows] *= scale
    if ours:
        fn = rows_kernel.linear_fn(w, b, residual, gelu)
        if stamp is not None:
            if kept is None or kept[0] != stamp:
                kept = _KEPT[layer] = (stamp, {})
            kept[1][args] = fn
        return fn
    if onednn:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, rows)
        if residual:
            return lambda x, r: torch.ops.mkldnn._linear_pointwise.binary(x, r, packed, b, "add")
        attr, algorithm = ("none", "") if gelu is None else ("gelu", gelu)
        return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, b, attr, [], algorithm)
    if w.dtype == torch.float32 and gelu is None and not residual and torch.backends.mkl.is_available():
        packed = torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
        return lambda x: torch.ops.mkl._mkl_linear(x, packed, w, b, rows)
    return None


def _stamp(layer: nn.Linear):
    """What a kept copy of ``layer`` was made from: its weight's and bias's dtype, shape and bytes
    (:func:`t2i.models.rows.fingerprint`, so a change through ``.data`` counts too); None: cannot tell."""
    parts = []
    for t in (layer.weight, layer.bias):
        if t is None:
            parts.append(None)
            continue
        t = t.detach()
        fp = rows_kernel.fingerprint(t)
        if fp is None:
            return None
        parts.append((t.dtype, tuple(t.shape), fp))
    return tuple(parts)


def forget_packed(module: nn.Module) -> None:
    """Drop the packed copies :func:`pack_linear` keeps for ``module``'s linear layers (the memory they
    hold; ``Transformer.train()`` calls it, as training changes the weights)."""
    for m in module.modules():
        _KEPT.pop(m, None)


def linear(layer: nn.Linear, x: torch.Tensor, cache: KVCache | None = None, gelu: str | None = None) -> torch.Tensor:
    """``layer(x)`` (then ``F.gelu(..., approximate=gelu)`` where ``gelu`` is given), through the cache's packed
    copy of the layer when it has one and it computes what ``layer(x)`` would: no gradient, and ``x`` in the
    copy's dtype with no autocast on, or autocast on in the dtype the copy was made for (``cache.autocast``;
    ``x`` is cast to it, as autocast would)."""
    fast = cache.packed.get((layer, gelu)) if cache is not None else None
    if fast is not None and not torch.is_grad_enabled():
        if cache.autocast is not None:
            if cache.autocast_on(x):
                return fast(x.to(cache.autocast))
        elif x.dtype == layer.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            return fast(x)
    y = linear(layer, x, cache) if gelu is not None and cache is not None else layer(x)
    return y if gelu is None else F.gelu(y, approximate=gelu)


_compiled_flex = None


def flex(q, k, v, block_mask):
    """FlexAttention, compiled on GPU (eager FlexAttention materialises the scores; it is for CPU checks)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if q.device.type != "cuda":
        return flex_attention(q, k, v, block_mask=block_mask)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask)


class Attention(nn.Module):
    """Multi-head self-attention with a per-layer pattern mask (see the module docstring).

    ``pb_relax`` (CogView): scores are computed as ``(q / (alpha * sqrt(d))) k^T``, shifted by their
    row maximum and multiplied back by ``alpha`` in float32, so half-precision logits cannot overflow.
    """

    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0, pb_relax: bool = False,
                 pb_alpha: float = 32.0, impl: str = "sdpa"):
        super().__init__()
        if d_model % n_head:
            raise ConfigError(f"model.d_model={d_model} is not divisible by model.n_head={n_head}")
        if impl not in IMPLS:
            raise ConfigError(f"model.attn_impl={impl!r} is unknown; use one of {', '.join(IMPLS)}")
        self.n_head, self.head_dim = n_head, d_model // n_head
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout
        self.pb_relax, self.pb_alpha, self.impl = pb_relax, pb_alpha, impl

    def forward(self, x: torch.Tensor, mask: torch.Tensor, start: int = 0, cache: KVCache | None = None,
                layer: int = 0, rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
                block_mask=None, keys: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, t, d]`` at positions ``[start, start + t)``. ``mask`` is the layer's full ``[L, L]``
        mask; with a ``cache`` the new keys are stored and queries see every cached position. ``keys``
        (a decode step, ``t == 1``): the cached positions the query may see; only those are read."""
        B, t, _ = x.shape
        q, k, v = linear(self.qkv, x, cache).view(B, t, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        if rotary is not None:
            cos, sin = rotary
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, start, k, v)
        end = start + t
        p = self.dropout if self.training else 0.0
        if cache is not None and t == 1 and not self.pb_relax:  # a decode step
            y = step_attention(q, k, v, keys, mask[start:end, :end], self.impl, p)
            return linear(self.proj, y.transpose(1, 2).reshape(B, t, -1), cache)
        if keys is not None:  # a PB-relax decode step: the row / column / window of the cache its mask row allows
            k, v = (torch.cat([read_keys(x, piece) for piece in keys], 2) for x in (k, v))
            mask = None
        else:
            mask = mask[start:end, :end]
        if self.pb_relax:
            y = self._pb_relax_attention(q, k, v, mask, p)
        elif self.impl == "flex" and block_mask is not None and cache is None:
            y = flex(q, k, v, block_mask)
        else:
            y = attend(q, k, v, mask, p, self.impl)
        return linear(self.proj, y.transpose(1, 2).reshape(B, t, -1), cache)

    def _pb_relax_attention(self, q, k, v, mask, p):
        scores = (q / (self.pb_alpha * math.sqrt(self.head_dim))) @ k.transpose(-2, -1)
        scores = scores.float()
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        scores = (scores - scores.amax(-1, keepdim=True).detach()) * self.pb_alpha
        att = F.dropout(scores.softmax(-1), p=p, training=p > 0)
        return att.to(v.dtype) @ v
