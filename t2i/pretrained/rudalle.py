"""Import ruDALL-E (Malevich and its v3 relatives, Russian) as a t2i checkpoint.

A ruDALL-E model is ``pytorch_model_v3.bin`` (the transformer), ``bpe.model`` (YouTokenToMe BPE, 16384
ids with <PAD>=0, <UNK>=1, <BOS>=2, <EOS>=3) and the Sber VQGAN (a taming ``GumbelVQ`` f8 with 8192 codes:
``vqgan.gumbelf8-sber.model.ckpt``). The transformer (``rudalle/dalle/{model,transformer}.py``):

- ``text_embeddings [vocab, d]`` with ``vocab = 16384 + text_len``: a pad (id 0) at text position ``p``
  becomes id ``16384 + p`` -- our per-position pads with ``text_vocab = 16384``;
- ``text_pos_embeddings [text_len + 1, d]`` (the last row is used only by v2 models),
  ``image_row_embeddings``, ``image_col_embeddings`` -- our ``text_pos``, ``row_pos``, ``col_pos``;
- per layer: ``input_layernorm``, ``attention.query_key_value`` (q, k, v stacked) and ``attention.dense``,
  CogView's sandwich LayerNorms (``before_first_addition_layernorm``, ``before_second_addition_layernorm``),
  ``post_attention_layernorm``, ``mlp.dense_h_to_4h`` / ``dense_4h_to_h`` with the tanh GELU;
- layer ``i`` attends by column when ``(i - 1) % 4 == 0``, by convolution (kernel 11, clamped at the
  border, which is the same set as ours) on the last layer, by row otherwise -- our ``dalle`` schedule,
  written out per layer here;
- ``transformer.final_layernorm``, then ``to_logits`` = LayerNorm + one Linear (with bias) over the text
  and image vocabularies: our ``ln_f``, ``logits_ln``, and ``text_head`` / ``image_head`` with
  ``head_bias``;
- the embeddings' gradient is scaled by 0.1 (``embed_grad_scale``); loss (text + 7 image) / 8.

Its PB-relax only shifts the attention scores before the softmax, which does not change the result;
the imported model computes attention in float32 softmax (``attn_impl=sdpa``/``math``), so it is
off. Only ``hf_version='v3'`` weights (Malevich, Surrealist_XL, Kandinsky) are supported: v2 models
(Malevich_v2, Emojich) prepend a fixed token and wrap the convolution mask around the image border.
"""

from __future__ import annotations

from t2i.errors import T2IError
from t2i.pretrained._pickle import read_weights, tensor_mapping

# rudalle/vae/vqgan.gumbelf8-sber.config.yml (the numbers of the Sber VQGAN release)
SBER_GUMBEL_F8 = {"model": {"target": "taming.models.vqgan.GumbelVQ", "params": {
    "kl_weight": 1.0e-08, "embed_dim": 256, "n_embed": 8192,
    "ddconfig": {"double_z": False, "z_channels": 256, "resolution": 256, "in_channels": 3, "out_ch": 3,
                 "ch": 128, "ch_mult": [1, 1, 2, 4], "num_res_blocks": 2, "attn_resolutions": [32],
                 "dropout": 0.0}}}}
BPE_VOCAB = 16384
CONV_KERNEL = 11


def layer_patterns(n_layer: int) -> list[str]:
    """ruDALL-E's per-layer masks (``DalleTransformer._get_layer_mask``), in our pattern names."""
    return ["column" if (i - 1) % 4 == 0 else "row" if i != n_layer - 1 else "conv" for i in range(n_layer)]


def infer_config(sd: dict, text_len: int, n_head: int | None, where: str) -> dict:
    """Our Transformer's arguments, read from the tensor shapes (``n_head`` cannot be: default d / 128)."""
    try:
        vocab, d = sd["text_embeddings.weight"].shape
        image_vocab = sd["image_embeddings.weight"].shape[0]
        side = sd["image_row_embeddings.weight"].shape[0]
        total = sd["to_logits.1.weight"].shape[0]
    except KeyError as e:
        raise T2IError(f"{where}: missing {e.args[0]} (not a ruDALL-E transformer?)") from None
    n_layer = 1 + max((int(k.split(".")[2]) for k in sd if k.startswith("transformer.layers.")), default=-1)
    if n_layer == 0:
        raise T2IError(f"{where}: no transformer.layers.* (not a ruDALL-E transformer?)")
    if total != vocab + image_vocab:
        raise T2IError(f"{where}: to_logits has {total} outputs, expected text {vocab} + image {image_vocab}")
    if vocab - text_len <= 0:
        raise T2IError(f"{where}: text vocabulary {vocab} is smaller than text_len={text_len}")
    n_head = int(n_head or max(1, d // 128))
    d_ff = sd["transformer.layers.0.mlp.dense_h_to_4h.weight"].shape[0]
    sandwich = "transformer.layers.0.before_first_addition_layernorm.weight" in sd
    return {"text_vocab": int(vocab - text_len), "text_len": int(text_len), "image_vocab": int(image_vocab),
            "image_grid": [int(side), int(side)], "n_layer": n_layer, "n_head": n_head, "d_model": int(d),
            "d_ff": int(d_ff), "dropout": 0.0, "attn_dropout": 0.0, "attention": layer_patterns(n_layer),
            "conv_kernel": CONV_KERNEL, "sandwich_ln": sandwich, "pb_relax": False, "text_pad_id": 0,
            "text_pad": "per_position", "image_pos": "rowcol", "gelu": "tanh", "head_bias": True,
            "logits_ln": True, "text_head": True, "embed_grad_scale": 0.1}


LAYER_NAMES = {"input_layernorm": "ln_1", "post_attention_layernorm": "ln_2",
               "attention.query_key_value": "attn.qkv", "attention.dense": "attn.proj",
               "before_first_addition_layernorm": "ln_attn_out", "before_second_addition_layernorm": "ln_mlp_out",
               "mlp.dense_h_to_4h": "mlp.fc", "mlp.dense_4h_to_h": "mlp.proj"}
MASK_BUFFERS = ("transformer.row_mask", "transformer.col_mask", "transformer.conv_mask")


def convert_dalle(sd: dict, config: dict, where: str) -> dict:
    """ruDALL-E ``DalleModel`` weights -> our Transformer's state dict; every key used or an error."""
    sd, used, out = dict(sd), set(MASK_BUFFERS) & set(sd), {}
    text_len, vocab = config["text_len"], config["text_vocab"] + config["text_len"]

    def take(key):
        if key not in sd:
            raise T2IError(f"{where}: missing {key}")
        used.add(key)
        return sd[key]

    out["text_emb.weight"] = take("text_embeddings.weight")
    out["image_emb.weight"] = take("image_embeddings.weight")
    pos = take("text_pos_embeddings.weight")
    if pos.shape[0] < text_len:
        raise T2IError(f"{where}: text_pos_embeddings has {pos.shape[0]} rows for text_len={text_len}")
    out["text_pos"] = pos[:text_len]
    out["row_pos"] = take("image_row_embeddings.weight")
    out["col_pos"] = take("image_col_embeddings.weight")
    for kind in ("weight", "bias"):
        out[f"ln_f.{kind}"] = take(f"transformer.final_layernorm.{kind}")
        out[f"logits_ln.{kind}"] = take(f"to_logits.0.{kind}")
        logits = take(f"to_logits.1.{kind}")
        out[f"text_head.{kind}"], out[f"image_head.{kind}"] = logits[:vocab], logits[vocab:]
    for i in range(config["n_layer"]):
        for theirs, ours in LAYER_NAMES.items():
            if ours.startswith("ln_") and ours.endswith("_out") and not config["sandwich_ln"]:
                continue
            for kind in ("weight", "bias"):
                out[f"blocks.{i}.{ours}.{kind}"] = take(f"transformer.layers.{i}.{theirs}.{kind}")
    left = sorted(set(sd) - used)
    if left:
        raise T2IError(f"{where}: unexpected keys {left[:5]}")
    return out


def load_rudalle(input, tokenizer, vae, vae_config=None, text_len: int = 128, n_head: int | None = None,
                 version: str = "v3", trust_pickle: bool = False) -> tuple[dict, dict, object, object, dict]:
    """Read a ruDALL-E release -> ``(model_config, state_dict, text_tokenizer, image_tokenizer, files)``.

    ``input``: ``pytorch_model_v3.bin``; ``tokenizer``: its ``bpe.model``; ``vae``: the Sber VQGAN
    ``.ckpt`` (``vae_config``: its taming YAML when not the released f8-8192 geometry); ``n_head``:
    the model's head count (16 for Malevich; default ``d_model / 128``)."""
    from t2i.data.vocabs import yttm_tokenizer
    from t2i.models.vqgan import VQGAN
    from t2i.pretrained.export import check_state, provenance
    from t2i.pretrained.taming import GENERATOR_PREFIXES, IGNORED_PREFIXES, _taming_state, taming_vqgan_config

    if version != "v3":
        raise T2IError(f"version={version}: only ruDALL-E v3 weights (Malevich, Surrealist_XL, Kandinsky) are "
                       "supported; v2 models (Malevich_v2, Emojich) prepend a fixed token and wrap the conv mask")
    where = f"ruDALL-E weights {input}"
    sd = read_weights(input, tensor_mapping, what="ruDALL-E weights", trust_pickle=trust_pickle)
    config = infer_config(sd, text_len, n_head, where)
    if config["d_model"] % config["n_head"]:
        raise T2IError(f"{where}: n_head={config['n_head']} does not divide d_model={config['d_model']}")
    state = convert_dalle(sd, config, where)
    if not tokenizer:
        raise T2IError("tokenizer= is required: the model's YouTokenToMe bpe.model")
    # its pipeline encodes text.lower().strip()
    text_tok = yttm_tokenizer(tokenizer, key="tokenizer", lowercase=True, strip=True)
    if not vae:
        raise T2IError("vae= is required: the Sber VQGAN checkpoint (vqgan.gumbelf8-sber.model.ckpt)")
    vq = read_weights(vae, _taming_state, what="Sber VQGAN checkpoint", trust_pickle=trust_pickle)
    vq = {k: v for k, v in vq.items() if k.startswith(GENERATOR_PREFIXES) and not k.startswith(IGNORED_PREFIXES)}
    image_tok = VQGAN(**taming_vqgan_config(vae_config or SBER_GUMBEL_F8))
    check_state(image_tok, vq, f"Sber VQGAN checkpoint {vae}")
    meta = provenance("rudalle", {"weights": input, "tokenizer": tokenizer, "vae": vae, "vae_config": vae_config})
    meta["version"] = version
    return config, state, text_tok, image_tok.eval(), meta

