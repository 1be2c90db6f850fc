"""Decoder-only text-to-image transformer over ``[text tokens ; image tokens]`` (DALL·E, CogView, ruDALL-E).

The sequence is ``text_len`` text ids (every pad becomes its own per-position pad token, as DALL·E
and ruDALL-E do) followed by the ``h x w`` image codes in raster order. Position ``p`` predicts token
``p + 1``: the text head reads positions ``0 .. text_len - 2``, the image head ``text_len - 1 ..``.
Layers are pre-LN blocks, each with its own attention pattern (:mod:`t2i.models.attention`);
CogView's Sandwich-LN and PB-relax are options.

A few options exist so released models load exactly (:mod:`t2i.pretrained`); their defaults are this
model's own design: ``text_pad`` (``shared``: one pad id, as EasyNLP's ARTIST), ``image_pos``
(``absolute``: one learned vector per image position, as minGPT), ``gelu`` (``tanh``: the GPT-2
approximation ruDALL-E uses), ``head_bias`` and ``logits_ln`` (ruDALL-E's logits layer has a bias and
its own LayerNorm after the final one), ``text_head``
(``false``: image logits only, as ARTIST; the text loss is then 0) and ``embed_grad_scale``
(CogView / ruDALL-E shrink the embeddings' gradient: ``0.1``).

``knowledge`` (``{"num_entities", "dim", "trainable", "fusion"}``, ARTIST; :mod:`t2i.models.knowledge`)
adds entity vectors to the caption: every method that reads text also takes ``entities``, a pair
``(ids [B, E], spans [B, E, 2])`` of linked entities (id -1: none), or None.

``captioning`` adds the image -> text direction to the same weights (CogView's self-reranking, OFA-style
captioning): the sequence ``[image codes ; caption]`` with the layers' patterns on the image part, every
caption token seeing the whole image, the same embeddings, position tables and heads, plus one learned
vector (``caption_emb``, zero at the start) added to every token of a captioning sequence so the model
knows the direction. ``caption_*`` methods train, score and decode it with the same KV cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from t2i.errors import ConfigError
from t2i.models import attention as A
from t2i.models.attention import (
    Attention,
    KVCache,
    forget_packed,
    layer_patterns,
    linear,
    pack_linear,
    rotary_angles,
    sequence_mask,
)
from t2i.models.decode_step import DecodeStep
from t2i.models.knowledge import KnowledgeFusion

GELUS = ("exact", "tanh")
TEXT_PADS = ("per_position", "shared")
IMAGE_POS = ("rowcol", "absolute")


class MLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float, gelu: str = "exact"):
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff)
        self.proj = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)
        self.approximate = "none" if gelu == "exact" else "tanh"

    def forward(self, x, cache: KVCache | None = None):
        h = linear(self.fc, x, cache, gelu=self.approximate)
        return self.dropout(linear(self.proj, h, cache))


class Block(nn.Module):
    """``x + attn(ln(x))``, ``x + mlp(ln(x))``; Sandwich-LN adds a LayerNorm on each branch's output."""

    def __init__(self, d_model, n_head, d_ff, dropout, attn_dropout, sandwich_ln, pb_relax, pb_alpha, impl,
                 gelu="exact"):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_head, attn_dropout, pb_relax, pb_alpha, impl)
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, d_ff, dropout, gelu)
        self.dropout = nn.Dropout(dropout)
        self.ln_attn_out = nn.LayerNorm(d_model) if sandwich_ln else nn.Identity()
        self.ln_mlp_out = nn.LayerNorm(d_model) if sandwich_ln else nn.Identity()
        self.pb_relax = pb_relax

    def _ln(self, ln, x):
        # PB-relax (CogView): LN(x) == LN(x / max|x|); dividing first keeps half precision in range
        return ln(x / x.detach().abs().amax(-1, keepdim=True).clamp_min(1e-6)) if self.pb_relax else ln(x)

    def forward(self, x, mask, start=0, cache=None, layer=0, rotary=None, block_mask=None, keys=None):
        a = self.attn(self._ln(self.ln_1, x), mask, start, cache, layer, rotary, block_mask, keys)
        x = x + self.dropout(self.ln_attn_out(a))
        return x + self.ln_mlp_out(self.mlp(self._ln(self.ln_2, x), cache))


class Transformer(nn.Module):
    """The stage-2 model. ``text_vocab`` is the text tokenizer's size and ``text_pad_id`` its pad id;
    ``image_vocab`` the image tokenizer's codebook size; ``image_grid`` its ``[h, w]``."""

    def __init__(self, text_vocab: int, text_len: int, image_vocab: int, image_grid=(8, 8), n_layer: int = 4,
                 n_head: int = 4, d_model: int = 256, d_ff: int | None = None, dropout: float = 0.0,
                 attn_dropout: float = 0.0, attention="full", conv_kernel: int = 11, attn_impl: str = "sdpa",
                 rotary: bool = False, sandwich_ln: bool = False, pb_relax: bool = False, pb_alpha: float = 32.0,
                 tie_weights: bool = False, text_pad_id: int = 0, text_pad: str = "per_position",
                 image_pos: str = "rowcol", gelu: str = "exact", head_bias: bool = False, text_head: bool = True,
                 logits_ln: bool = False, embed_grad_scale: float = 1.0, knowledge: dict | None = None,
                 captioning: bool = False):
        super().__init__()
        h, w = (int(s) for s in image_grid)
        if text_len < 1 or h < 1 or w < 1:
            raise ConfigError(f"model.text_len={text_len} and model.image_grid={list(image_grid)} must be positive")
        for key, value, allowed in (("text_pad", text_pad, TEXT_PADS), ("image_pos", image_pos, IMAGE_POS),
                                    ("gelu", gelu, GELUS)):
            if value not in allowed:
                raise ConfigError(f"model.{key}={value!r} is unknown; use one of {', '.join(allowed)}")
        if rotary and captioning:
            raise ConfigError("model.model.captioning has no rotary positions yet (the order of the sequence "
                              "differs): use model.model.rotary=false")
        if rotary and image_pos != "rowcol":
            raise ConfigError("model.model.rotary replaces the position tables: leave model.model.image_pos=rowcol")
        if attn_impl == "flex" and attn_dropout > 0:
            raise ConfigError("model.model.attn_impl=flex has no attention dropout; set model.model.attn_dropout=0 "
                              "or use sdpa")
        self.text_vocab, self.text_len, self.image_vocab = text_vocab, text_len, image_vocab
        self.grid, self.n_image = (h, w), h * w
        self.seq_len = text_len + h * w
        self.text_pad_id, self.text_pad, self.image_pos = text_pad_id, text_pad, image_pos
        self.embed_grad_scale = float(embed_grad_scale)
        self.n_layer, self.n_head, self.head_dim = n_layer, n_head, d_model // n_head
        self.patterns = layer_patterns(attention, n_layer)
        self.attn_impl = attn_impl

        n_text = text_vocab + (text_len if text_pad == "per_position" else 0)  # + one pad id per text position
        self.text_emb = nn.Embedding(n_text, d_model)
        self.image_emb = nn.Embedding(image_vocab, d_model)
        self.rotary = rotary
        if rotary:
            angles = rotary_angles(text_len, h, w, d_model // n_head)
            self.register_buffer("rot_cos", angles.cos(), persistent=False)
            self.register_buffer("rot_sin", angles.sin(), persistent=False)
        else:
            self.text_pos = nn.Parameter(torch.zeros(text_len, d_model))
            if image_pos == "rowcol":
                self.row_pos = nn.Parameter(torch.zeros(h, d_model))
                self.col_pos = nn.Parameter(torch.zeros(w, d_model))
            else:
                self.image_pos_emb = nn.Parameter(torch.zeros(h * w, d_model))
        self.knowledge = KnowledgeFusion(d_model=d_model, **knowledge) if knowledge else None
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(d_model, n_head, d_ff or 4 * d_model, dropout, attn_dropout, sandwich_ln, pb_relax, pb_alpha,
                  attn_impl, gelu) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.logits_ln = nn.LayerNorm(d_model) if logits_ln else None
        self.text_head = nn.Linear(d_model, n_text, bias=head_bias) if text_head else None
        self.image_head = nn.Linear(d_model, image_vocab, bias=head_bias)
        if tie_weights:
            if self.text_head is not None:
                self.text_head.weight = self.text_emb.weight
            self.image_head.weight = self.image_emb.weight
        masks = {p: sequence_mask(p, text_len, h, w, conv_kernel) for p in sorted(set(self.patterns))}
        for p, m in masks.items():
            self.register_buffer(f"mask_{p}", m, persistent=False)
        self.captioning = bool(captioning)
        if captioning:  # zeros, so the parameters drawn before and after are those of a model without it
            self.caption_emb = nn.Parameter(torch.zeros(d_model))
            for p in sorted(set(self.patterns)):
                self.register_buffer(f"cmask_{p}", A.caption_mask(p, text_len, h, w, conv_kernel), persistent=False)
        self._block_masks: dict = {}
        self._step_keys: dict = {}
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / (2 * n_layer) ** 0.5)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    # -- pieces ------------------------------------------------------------------------------
    def mask(self, layer: int, caption: bool = False) -> torch.Tensor:
        return getattr(self, f"{'cmask' if caption else 'mask'}_{self.patterns[layer]}")

    def text_ids(self, text: torch.Tensor) -> torch.Tensor:
        """Tokenizer ids ``[B, text_len]`` -> model ids: each pad becomes the pad id of its position."""
        if text.shape[1] != self.text_len:
            raise ConfigError(f"text has {text.shape[1]} tokens per caption, the model takes model.text_len="
                              f"{self.text_len}; tokenize with the same text_len")
        if self.text_pad == "shared":
            return text
        pos = torch.arange(self.text_len, device=text.device) + self.text_vocab
        return torch.where(text == self.text_pad_id, pos, text)

    def _fuses(self, entities, where: str) -> bool:
        return self.knowledge is not None and entities is not None and self.knowledge.fusion == where

    def embed(self, text: torch.Tensor | None, image: torch.Tensor | None, start: int = 0,
              entities=None) -> torch.Tensor:
        """Embeddings of a contiguous run of the sequence beginning at ``start``: ``text`` (model ids,
        when ``start < text_len``) then ``image`` codes ``[B, n]`` in raster order."""
        parts = []
        if text is not None and text.shape[1]:
            e = self.text_emb(text)
            if not self.rotary:
                e = e + self.text_pos[start:start + text.shape[1]]
            if self._fuses(entities, "input"):
                e = self.knowledge(e, *entities)
            parts.append(e)
        if image is not None and image.shape[1]:
            i0 = max(0, start - self.text_len)
            e = self.image_emb(image)
            if self.image_pos == "absolute":
                e = e + self.image_pos_emb[i0:i0 + image.shape[1]]
            elif not self.rotary:
                idx = torch.arange(i0, i0 + image.shape[1], device=image.device)
                w = self.grid[1]
                e = e + self.row_pos[idx // w] + self.col_pos[idx % w]
            parts.append(e)
        x = torch.cat(parts, dim=1)
        if self.embed_grad_scale != 1.0:  # same values, gradient times embed_grad_scale (CogView)
            x = x * self.embed_grad_scale + x.detach() * (1.0 - self.embed_grad_scale)
        return self.drop(x)

    def block_mask(self, layer: int, length: int, device):
        """FlexAttention block mask of a layer's pattern for a training sequence of ``length``."""
        key = (self.patterns[layer], length, str(device))
        if key not in self._block_masks:
            from torch.nn.attention.flex_attention import create_block_mask

            dense = self.mask(layer)[:length, :length].to(device)
            self._block_masks[key] = create_block_mask(lambda b, h, q, kv: dense[q, kv], None, None, length, length,
                                                       device=str(device))
        return self._block_masks[key]

    def step_keys(self, layer: int, position: int, caption: bool = False) -> tuple | None:
        """The cache positions a decode step at ``position`` attends to in ``layer`` (its mask row) as
        :func:`~t2i.models.attention.key_segments`, or None where that is every earlier position; kept per
        pattern and position."""
        key = (self.patterns[layer], caption, position)
        if key not in self._step_keys:
            self._step_keys[key] = A.key_segments(self.mask(layer, caption)[position, :position + 1])
        return self._step_keys[key]

    def step_index(self, layer: int, position: int, caption: bool = False) -> torch.Tensor:
        """The cache positions a decode step at ``position`` attends to in ``layer`` (its mask row's True
        entries) as an int64 tensor, kept per pattern and position (:func:`t2i.models.rows.step_attention`)."""
        key = (self.patterns[layer], caption, position, "index")
        if key not in self._step_keys:
            self._step_keys[key] = self.mask(layer, caption)[position, :position + 1].nonzero()[:, 0].contiguous()
        return self._step_keys[key]

    def hidden(self, x: torch.Tensor, start: int = 0, cache: KVCache | None = None, entities=None,
               caption: bool = False) -> torch.Tensor:
        t = x.shape[1]
        rot = (self.rot_cos[start:start + t], self.rot_sin[start:start + t]) if self.rotary else None
        flex = self.attn_impl == "flex" and cache is None and start == 0 and not caption
        if flex and x.device.type == "cpu" and torch.is_grad_enabled():
            raise ConfigError("model.model.attn_impl=flex cannot train on CPU (FlexAttention has no CPU backward); "
                              "use model.model.attn_impl=sdpa there")
        step = cache.step if cache is not None and t == 1 else None
        if step is not None and step.usable(x):  # a decode step, written out (t2i.models.decode_step)
            x = step(x, start, cache, caption)
        else:
            for i, block in enumerate(self.blocks):
                bm = self.block_mask(i, t, x.device) if flex else None
                keys = self.step_keys(i, start, caption) if cache is not None and t == 1 else None
                x = block(x, self.mask(i, caption), start, cache, i, rot, bm, keys)
        if start == 0 and not caption and self._fuses(entities, "easynlp"):  # EasyNLP: on the text states after the last block
            T = self.text_len
            x = torch.cat([self.knowledge(x[:, :T], *entities), x[:, T:]], dim=1)
        x = self.ln_f(x)
        return self.logits_ln(x) if self.logits_ln is not None else x

    # -- training ----------------------------------------------------------------------------
    def forward(self, text: torch.Tensor, image: torch.Tensor, entities=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``text`` tokenizer ids ``[B, text_len]``, ``image`` codes ``[B, h, w]`` or ``[B, h*w]`` ->
        ``(text_logits [B, text_len - 1, text ids], image_logits [B, h*w, image_vocab])``: the logits for
        text tokens ``1 ..`` (None without a text head) and for every image token."""
        image = image.flatten(1)
        if image.shape[1] != self.n_image:
            raise ConfigError(f"image codes have {image.shape[1]} positions, the model's grid "
                              f"{self.grid[0]}x{self.grid[1]} has {self.n_image}")
        x = self.embed(self.text_ids(text), image[:, :-1], entities=entities)
        hid = self.hidden(x, entities=entities)
        T = self.text_len
        text_logits = self.text_head(hid[:, :T - 1]) if self.text_head is not None else None
        return text_logits, self.image_head(hid[:, T - 1:])

    def loss(self, text: torch.Tensor, image: torch.Tensor, entities=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy of the text tokens (every position after the first, pads included, as
        DALL·E) and of the image tokens. The text loss is 0 for a model without a text head."""
        text_logits, image_logits = self(text, image, entities)
        targets = self.text_ids(text)[:, 1:]
        if text_logits is None or self.text_len < 2:
            text_loss = image_logits.new_zeros((), dtype=torch.float32)
        else:
            text_loss = F.cross_entropy(text_logits.float().flatten(0, 1), targets.flatten())
        image_loss = F.cross_entropy(image_logits.float().flatten(0, 1), image.flatten().long())
        return text_loss, image_loss

    def train(self, mode: bool = True):
        if mode:  # training changes the weights: drop the decode step's kept packed copies (their memory)
            forget_packed(self)
        return super().train(mode)

    # -- decoding ----------------------------------------------------------------------------
    def new_cache(self, batch: int, device, dtype: torch.dtype | None = None) -> KVCache:
        """An empty cache for ``batch`` sequences, with the linear layers packed for its decode steps
        (:func:`~t2i.models.attention.pack_linear`): the blocks as a
        :class:`~t2i.models.decode_step.DecodeStep` where it covers them, else layer by layer. The copies
        ``rows.c`` runs (2-32 rows) are kept with the model and reused by the next cache while the weights
        hold the same bytes (a fingerprint, not a version counter, so a write through ``.data`` counts);
        ``train()`` or :func:`~t2i.models.attention.forget_packed` drops them. oneDNN's live as long as the cache.
        ``dtype`` None: the autocast dtype where autocast is on for ``device`` (its GEMMs make the keys and
        values, so nothing is lost), else the weights'. Made under CPU autocast to bfloat16 over float32
        weights, the copies are bfloat16 (``cache.autocast``), used while that autocast is on; under other
        autocasts none are made."""
        kind = torch.device(device).type
        weights = next(self.parameters()).dtype
        if dtype is None:
            dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else weights
        cache = KVCache(self.n_layer, batch, self.n_head, self.seq_len, self.head_dim, device, dtype)
        heads = [h for h in (self.image_head, self.text_head) if h is not None]
        cpu = kind == "cpu"
        amp = torch.get_autocast_dtype("cpu") if cpu and torch.is_autocast_enabled("cpu") else None
        if amp == weights:
            amp = None  # autocast to the weights' own dtype changes nothing
        elif amp is not None and (amp, weights) != (torch.bfloat16, torch.float32):
            return cache  # bf16 over float32 only; other autocasts: F.linear
        cache.autocast = amp
        with torch.no_grad():
            cache.step = DecodeStep.build(self, batch, amp) if cpu else None
            blocks = [] if cache.step is not None else self.blocks
            for layer, gelu in [(m, None) for b in blocks for m in (b.attn.qkv, b.attn.proj, b.mlp.proj)] + \
                    [(b.mlp.fc, b.mlp.approximate) for b in blocks] + [(h, None) for h in heads]:
                fast = pack_linear(layer, batch, gelu, dtype=amp) if gelu else None  # the GELU fused where it can be
                gelu = gelu if fast is not None else None
                fast = fast or pack_linear(layer, batch, dtype=amp)
                if fast is not None:
                    cache.packed[layer, gelu] = fast
        return cache

    def prefill(self, text: torch.Tensor, cache: KVCache | None, image: torch.Tensor | None = None,
                entities=None) -> torch.Tensor:
        """Run the caption (and primed image codes) through the model; returns the image logits for the
        next image position ``[B, image_vocab]``."""
        x = self.embed(self.text_ids(text), image, entities=entities)
        hid = self.hidden(x, 0, cache, entities)
        return self.image_head(hid[:, -1])

    def decode_step(self, code: torch.Tensor, index: int, cache: KVCache) -> torch.Tensor:
        """Feed image code ``index`` (``[B]``) with the cache; returns the logits of image code ``index + 1``."""
        start = self.text_len + index
        hid = self.hidden(self.embed(None, code[:, None], start), start, cache)
        return linear(self.image_head, hid[:, -1], cache)

    def image_logits_uncached(self, text: torch.Tensor, image: torch.Tensor, entities=None) -> torch.Tensor:
        """The next image code's logits from a full forward pass over the caption and ``image`` so far."""
        x = self.embed(self.text_ids(text), image, entities=entities)
        return self.image_head(self.hidden(x, entities=entities)[:, -1])

    # -- captioning (image -> text) ----------------------------------------------------------
    def _need_captioning(self):
        if not self.captioning:
            raise ConfigError("this model has no image -> text direction: train it with model.model.captioning=true")

    def embed_caption(self, image: torch.Tensor | None, text: torch.Tensor | None, start: int = 0) -> torch.Tensor:
        """Embeddings of a run of the captioning sequence ``[image codes (n) ; caption (text_len)]`` from
        ``start``: image codes ``[B, k]`` (when ``start < n``) then caption model ids."""
        self._need_captioning()
        n, parts = self.n_image, []
        if image is not None and image.shape[1]:
            e = self.image_emb(image)
            if self.image_pos == "absolute":
                e = e + self.image_pos_emb[start:start + image.shape[1]]
            else:
                idx = torch.arange(start, start + image.shape[1], device=image.device)
                e = e + self.row_pos[idx // self.grid[1]] + self.col_pos[idx % self.grid[1]]
            parts.append(e)
        if text is not None and text.shape[1]:
            t0 = max(0, start - n)
            parts.append(self.text_emb(text) + self.text_pos[t0:t0 + text.shape[1]])
        x = torch.cat(parts, dim=1) + self.caption_emb
        if self.embed_grad_scale != 1.0:
            x = x * self.embed_grad_scale + x.detach() * (1.0 - self.embed_grad_scale)
        return self.drop(x)

    def caption_forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Image codes ``[B, h, w]`` and captions (tokenizer ids ``[B, text_len]``) -> the logits of every
        caption token ``[B, text_len, text ids]`` (token ``k`` read from the position before it)."""
        image = image.flatten(1)
        if self.text_head is None:
            raise ConfigError("captioning needs a text head (model.model.text_head=true)")
        x = self.embed_caption(image, self.text_ids(text)[:, :-1])
        hid = self.hidden(x, caption=True)
        return self.text_head(hid[:, self.n_image - 1:])

    def caption_loss(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of every caption token given the image (pads included: they end the caption)."""
        logits = self.caption_forward(image, text)
        return F.cross_entropy(logits.float().flatten(0, 1), self.text_ids(text).flatten())

    def caption_logprob(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``[B]``: mean log-probability of each caption's tokens and of its end (the first pad) given the
        image -- the caption-likelihood score of CogView's self-reranking."""
        logp = self.caption_forward(image, text).float().log_softmax(-1)
        ids = self.text_ids(text)
        tok = logp.gather(-1, ids[..., None])[..., 0]
        is_pad = text == self.text_pad_id
        first_pad = is_pad & (is_pad.long().cumsum(1) == 1)
        keep = (~is_pad) | first_pad
        return (tok * keep).sum(1) / keep.sum(1).clamp_min(1)

    def caption_prefill(self, image: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """Run the image codes through the model; the logits of caption token 0 ``[B, text ids]``."""
        hid = self.hidden(self.embed_caption(image.flatten(1), None), 0, cache, caption=True)
        return self.text_head(hid[:, -1])

    def caption_step(self, token: torch.Tensor, index: int, cache: KVCache) -> torch.Tensor:
        """Feed caption token ``index`` (model ids ``[B]``); the logits of token ``index + 1``."""
        start = self.n_image + index
        hid = self.hidden(self.embed_caption(None, token[:, None], start), start, cache, caption=True)
        return linear(self.text_head, hid[:, -1], cache)

    def caption_logits_uncached(self, image: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """The next caption token's logits from a full pass over the image and the caption so far (model ids)."""
        hid = self.hidden(self.embed_caption(image.flatten(1), prefix), caption=True)
        return self.text_head(hid[:, -1])
