"""Released text-to-image transformers imported into our Transformer compute what their own code computes.

The references are built here with random weights at a small geometry: taming's minGPT ``GPT`` for the
EasyNLP pai-painter / ARTIST layout, ``rudalle``'s ``DalleModel`` for ruDALL-E. Every parameter (layer
norms and position tables included, which the references initialise to constants) is randomised first, so
a weight mapped to the wrong place cannot go unseen.
"""

from __future__ import annotations

import pytest
import torch

from t2i.errors import T2IError
from t2i.models.transformer import Transformer
from t2i.pretrained import easynlp, rudalle
from t2i.sampling import generate
from tests.peers import mingpt_gpt, rudalle_module

pytestmark = pytest.mark.compat


def randomize(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


# -- EasyNLP (minGPT) ------------------------------------------------------------------------------
V_IMG, V_TXT, T, SIDE = 40, 30, 6, 4


def easynlp_reference(n_layer=2, d=32, n_head=4, seed=0):
    torch.manual_seed(seed)
    gpt = mingpt_gpt()(vocab_size=V_IMG + V_TXT, block_size=T + SIDE * SIDE, n_layer=n_layer, n_head=n_head,
                       n_embd=d)
    gpt.head = torch.nn.Linear(d, V_IMG, bias=False)  # EasyNLP's head covers the image codes only
    randomize(gpt, seed)
    cfg = {"img_vocab_size": V_IMG, "text_vocab_size": V_TXT, "vocab_size": V_IMG + V_TXT,
           "block_size": T + SIDE * SIDE, "n_layer": n_layer, "n_head": n_head, "n_embd": d}
    return gpt.eval(), cfg


def caption_batch(seed=1, batch=3):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, V_TXT, (batch, T), generator=g)
    text[0, 3:] = 0  # pads: ARTIST's captions are padded with [PAD] = 0
    text[1, 1:] = 0
    image = torch.randint(0, V_IMG, (batch, SIDE * SIDE), generator=g)
    return text, image


def imported_easynlp(gpt, cfg) -> Transformer:
    config = easynlp.model_config(cfg, text_len=T)
    state = easynlp.convert_gpt(gpt.state_dict(), config, "test")
    model = Transformer(**config)
    model.load_state_dict(state, strict=True)
    return model.eval()


def test_easynlp_logits_equal_mingpt():
    gpt, cfg = easynlp_reference()
    model = imported_easynlp(gpt, cfg)
    text, image = caption_batch()
    with torch.no_grad():
        ref, _ = gpt(torch.cat([text + V_IMG, image], 1)[:, :-1])  # EasyNLP: text ids shifted past the codes
        text_logits, image_logits = model(text, image)
    assert text_logits is None
    assert image_logits.shape == (3, SIDE * SIDE, V_IMG)
    torch.testing.assert_close(image_logits, ref[:, T - 1:], atol=1e-4, rtol=0)


def test_easynlp_cached_sampling_equals_uncached():
    gpt, cfg = easynlp_reference(seed=3)
    model = imported_easynlp(gpt, cfg)
    text, _ = caption_batch(seed=4, batch=2)
    runs = [generate(model, text, num_samples=3, top_k=8, use_cache=c, generator=torch.Generator().manual_seed(5))
            for c in (True, False)]
    assert torch.equal(runs[0], runs[1])


def test_easynlp_strict_key_errors():
    gpt, cfg = easynlp_reference()
    config = easynlp.model_config(cfg, text_len=T)
    sd = gpt.state_dict()
    broken = {k: v for k, v in sd.items() if k != "blocks.1.attn.value.bias"}
    with pytest.raises(T2IError, match=r"where-1: missing transformer.blocks.1.attn.value.bias"):
        easynlp.convert_gpt(broken, config, "where-1")
    extra = {**sd, "blocks.2.ln1.weight": torch.zeros(32)}
    with pytest.raises(T2IError, match=r"where-2: unexpected transformer keys \['blocks.2.ln1.weight'\]"):
        easynlp.convert_gpt(extra, config, "where-2")
    with pytest.raises(T2IError, match="not a square grid"):
        easynlp.model_config(cfg, text_len=T + 1)


@pytest.mark.parametrize("key,shape", [("blocks.0.attn.value.weight", (32, 16)), ("blocks.1.attn.key.bias", (31,)),
                                       ("blocks.0.mlp.0.weight", (64, 32)), ("blocks.1.ln2.weight", (33,)),
                                       ("tok_emb.weight", (69, 32)), ("pos_emb", (1, 4, 32)), ("head.weight", (40, 16))])
def test_easynlp_wrong_shape_names_the_files_key_before_combining(key, shape):
    """Each source tensor is checked before torch.cat: one line with the key as the file spells it, both shapes."""
    gpt, cfg = easynlp_reference()
    config = easynlp.model_config(cfg, text_len=T)
    sd = {**gpt.state_dict(), key: torch.zeros(shape)}
    with pytest.raises(T2IError) as e:
        easynlp.convert_gpt(sd, config, "w.bin")
    msg = str(e.value)
    assert msg.startswith(f"w.bin: transformer.{key} has shape {list(shape)}, expected ["), msg
    assert "\n" not in msg


@pytest.mark.parametrize("n_unmasked", [12, 1])
def test_easynlp_n_unmasked_is_refused_naming_the_key(n_unmasked):
    """taming's GPT lets the first n_unmasked positions see each other both ways; ours is causal: refuse."""
    _, cfg = easynlp_reference()
    with pytest.raises(T2IError, match=rf"^config.json: n_unmasked={n_unmasked}: .* only releases whose n_unmasked is 0"):
        easynlp.model_config({**cfg, "n_unmasked": n_unmasked}, text_len=T)
    assert easynlp.model_config({**cfg, "n_unmasked": 0}, text_len=T) == easynlp.model_config(cfg, text_len=T)


# -- ruDALL-E ------------------------------------------------------------------------------------------
R_T, R_SIDE, R_IMG = 8, 7, 24  # 7 x 7 grid: the 11-wide conv window is clamped at every border


def rudalle_reference(n_layer=8, d=32, n_head=4, sandwich=True, seed=0):
    DalleModel = rudalle_module("rudalle.dalle.model").DalleModel
    torch.manual_seed(seed)
    ref = DalleModel(device="cpu", num_layers=n_layer, vocab_size=20 + R_T, hidden_size=d,
                     num_attention_heads=n_head, embedding_dropout_prob=0.0, attention_dropout_prob=0.0,
                     output_dropout_prob=0.0, text_seq_length=R_T, image_tokens_per_dim=R_SIDE,
                     image_vocab_size=R_IMG, cogview_sandwich_layernorm=sandwich, cogview_pb_relax=True,
                     is_bool_mask=True, hf_version="v3")
    randomize(ref, seed)
    return ref.eval()


def rudalle_inputs(seed=2, batch=3):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(4, 20, (batch, R_T), generator=g)
    text[:, 0] = 2  # <BOS>
    text[0, 4], text[0, 5:] = 3, 0  # <EOS>, then pads (id 0)
    text[1, 2], text[1, 3:] = 3, 0
    image = torch.randint(0, R_IMG, (batch, R_SIDE * R_SIDE), generator=g)
    return text, image


def imported_rudalle(ref, n_head=4) -> Transformer:
    sd = ref.state_dict()
    config = rudalle.infer_config(sd, R_T, n_head, "test")
    model = Transformer(**config)
    model.load_state_dict(rudalle.convert_dalle(sd, config, "test"), strict=True)
    return model.eval()


@pytest.mark.parametrize("sandwich", [True, False])
def test_rudalle_logits_equal_dalle_model(sandwich):
    ref = rudalle_reference(sandwich=sandwich)
    model = imported_rudalle(ref)
    assert model.patterns == ["row", "column", "row", "row", "row", "column", "row", "conv"]
    text, image = rudalle_inputs()
    seq = torch.cat([text, image], 1)
    n = seq.shape[1]
    with torch.no_grad():
        logits, _ = ref(seq, torch.ones(1, 1, n, n))
        text_logits, image_logits = model(text, image)
    vocab = 20 + R_T
    torch.testing.assert_close(text_logits, logits[:, :R_T - 1, :vocab], atol=1e-4, rtol=0)
    torch.testing.assert_close(image_logits, logits[:, R_T - 1:n - 1, vocab:], atol=1e-4, rtol=0)


def test_rudalle_layer_schedule():
    """Column where ``(i - 1) % 4 == 0`` wins over the last layer's conv: a 6-layer model has no conv layer."""
    assert rudalle.layer_patterns(6) == ["row", "column", "row", "row", "row", "column"]
    assert rudalle.layer_patterns(24)[-1] == "conv" and rudalle.layer_patterns(24).count("column") == 6


def test_rudalle_masks_match_ours():
    """Our row / column / conv patterns equal ruDALL-E's mask matrices (v3: the conv window clamps)."""
    from t2i.models.attention import sequence_mask

    ia = rudalle_module("rudalle.dalle.image_attention")
    for side in (5, 7, 12):
        theirs = {"row": ia.get_row_mask(R_T, side, is_bool_mask=True),
                  "column": ia.get_col_mask(R_T, side, is_bool_mask=True),
                  "conv": ia.get_conv_mask(R_T, side, kernel=11, is_bool_mask=True, hf_version="v3")}
        for name, mask in theirs.items():
            assert torch.equal(sequence_mask(name, R_T, side, side, 11), mask), (name, side)


def test_rudalle_loss_equals_dalle_model():
    """Their training loss on text + image equals ours on the same sequence, except for one term: ruDALL-E v3
    scores image token 0 with the *text* logits of the last text position; ours with the image head."""
    ref = rudalle_reference(seed=7)
    model = imported_rudalle(ref)
    text, image = rudalle_inputs(seed=8)
    seq = torch.cat([text, image], 1)
    n = seq.shape[1]
    with torch.no_grad():
        _, parts = ref(seq, torch.ones(1, 1, n, n), return_loss=True)
        text_loss, image_loss = model.loss(text, image)
        _, image_logits = model(text, image)
    their_image = torch.nn.functional.cross_entropy(image_logits[:, 1:].flatten(0, 1), image[:, 1:].flatten())
    torch.testing.assert_close(their_image, parts["image"], atol=1e-4, rtol=0)
    assert torch.isfinite(text_loss) and torch.isfinite(image_loss)


def test_rudalle_cached_sampling_equals_uncached():
    model = imported_rudalle(rudalle_reference(seed=11))
    text, _ = rudalle_inputs(seed=12, batch=2)
    runs = [generate(model, text, num_samples=2, top_k=6, use_cache=c, generator=torch.Generator().manual_seed(1))
            for c in (True, False)]
    assert torch.equal(runs[0], runs[1])


def test_rudalle_strict_key_errors():
    ref = rudalle_reference(n_layer=2)
    sd = ref.state_dict()
    config = rudalle.infer_config(sd, R_T, 4, "f.bin")
    with pytest.raises(T2IError, match=r"f.bin: missing transformer.layers.1.attention.dense.weight"):
        rudalle.convert_dalle({k: v for k, v in sd.items() if k != "transformer.layers.1.attention.dense.weight"},
                              config, "f.bin")
    with pytest.raises(T2IError, match=r"f.bin: unexpected keys \['extra.weight'\]"):
        rudalle.convert_dalle({**sd, "extra.weight": torch.zeros(1)}, config, "f.bin")
    with pytest.raises(T2IError, match="f.bin: missing text_embeddings.weight"):
        rudalle.infer_config({"x": torch.zeros(1)}, R_T, 4, "f.bin")
