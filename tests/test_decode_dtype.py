"""``decode_dtype`` (Pipeline, t2i-generate): the image tokenizer alone decodes under bfloat16 autocast; the
codes are those of the float32 run and the pixels stay close; settings that cannot work are refused first."""

from __future__ import annotations

import pytest
import torch

from t2i.errors import ConfigError


@pytest.fixture(scope="module")
def vqgan_transformer(tmp_path_factory):
    """A tiny random VQGAN (8 px, 4 x 4 codes) as a stage-1 checkpoint and a transformer checkpoint carrying it."""
    from t2i.data.tokenizer import TextTokenizer
    from t2i.keys import TOKENIZER_KEY
    from t2i.lit.transformer import TransformerModule
    from t2i.models.records import tokenizer_entry
    from t2i.models.vqgan import VQGAN

    folder = tmp_path_factory.mktemp("decode_dtype")
    torch.manual_seed(0)
    vq = VQGAN(ch=32, ch_mult=[1, 1], num_res_blocks=1, attn_resolutions=[], z_channels=4, embed_dim=4, n_embed=8,
               resolution=8)
    torch.save({"state_dict": {"model." + k: v for k, v in vq.state_dict().items()},
                TOKENIZER_KEY: tokenizer_entry("t2i.models.vqgan.VQGAN", vq.config, "model.")}, folder / "vq.ckpt")
    tok = TextTokenizer.train(["a red circle", "a blue square"] * 3, vocab_size=40)
    module = TransformerModule(model=dict(text_vocab=tok.vocab_size, text_pad_id=0, image_vocab=8, image_grid=[4, 4],
                                          text_len=4, n_layer=1, n_head=2, d_model=16),
                               image_tokenizer=str(folder / "vq.ckpt"))
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
            "datamodule": {"tokenizer": tok.to_str()}}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, folder / "t2i.ckpt")
    return folder / "t2i.ckpt"


def test_bf16_decode_runs_under_autocast_and_stays_close(vqgan_transformer):
    from t2i.pipeline import Pipeline

    plain = Pipeline.from_checkpoint(vqgan_transformer, device="cpu")
    fast = Pipeline.from_checkpoint(vqgan_transformer, device="cpu", decode_dtype="bf16")
    assert plain.decode_dtype is None and fast.decode_dtype is torch.bfloat16
    seen = []
    decode = fast.image_tokenizer.decode
    fast.image_tokenizer.decode = lambda c: seen.append(torch.is_autocast_enabled("cpu")) or decode(c)
    a, b = plain("a red circle", 3, seed=1), fast("a red circle", 3, seed=1)
    assert seen and all(seen)                                   # the decode ran under autocast
    assert all(torch.equal(x, y) for x, y in zip(a.codes, b.codes))   # sampling untouched: the same codes
    diff = (a.pixels[0] - b.pixels[0]).abs().max().item()
    assert diff < 0.05                                          # bfloat16 rounding, nothing more


def test_generate_writes_bf16_decoded_images(vqgan_transformer, tmp_path):
    from PIL import Image

    from t2i.cli.generate import run
    from tests.test_generate import generate_cfg

    base = [f"ckpt={vqgan_transformer}", "prompts=['a red circle']", "num_samples=2", "batch_size=2", "device=cpu"]
    run(generate_cfg(tmp_path / "fp32", *base))
    run(generate_cfg(tmp_path / "bf16", *base, "decode_dtype=bf16"))
    for j in range(2):
        x, y = (torch.tensor(list(Image.open(tmp_path / d / "gen" / f"p000_s{j:02d}.png").getdata())).float()
                for d in ("fp32", "bf16"))
        assert (x - y).abs().max() <= 8                         # 8 / 255: bfloat16's 3 significant digits


@pytest.mark.parametrize("value, message", [("fp8", r"decode_dtype=fp8 is unknown; use one of bf16"),
                                            ("fp16", r"decode_dtype=fp16 needs a GPU")])
def test_bad_decode_dtype_is_one_error_naming_the_key(vqgan_transformer, tmp_path, value, message):
    from t2i.cli.generate import run
    from tests.test_generate import generate_cfg

    cfg = generate_cfg(tmp_path, f"ckpt={vqgan_transformer}", "prompts=['a red circle']", f"decode_dtype={value}",
                       "device=cpu")
    with pytest.raises(ConfigError, match=message):
        run(cfg)


def test_decode_dtype_follows_dtype_unless_given(vqgan_transformer):
    from t2i.pipeline import Pipeline

    both = Pipeline.from_checkpoint(vqgan_transformer, device="cpu", dtype="bf16")
    plain_decode = Pipeline.from_checkpoint(vqgan_transformer, device="cpu", dtype="bf16", decode_dtype="fp32")
    assert both.decode_dtype is torch.bfloat16
    seen = []
    decode = plain_decode.image_tokenizer.decode
    plain_decode.image_tokenizer.decode = lambda c: seen.append(torch.is_autocast_enabled("cpu")) or decode(c)
    plain_decode.decode(torch.zeros(1, 4, 4, dtype=torch.long))
    assert seen == [False]                                      # fp32 asked for: no autocast, whatever dtype says


def test_bf16_pipeline_samples_through_bf16_packed_weights_on_cpu(vqgan_transformer):
    """Pipeline(dtype="bf16") on a CPU samples under autocast: the cache is bfloat16 and its decode step runs
    bfloat16 copies of the weights made once (autocast alone would cast every weight on every step, slower
    than float32: experiments/transformer_speed/RESULTS_roofline.md)."""
    from t2i.pipeline import Pipeline

    pipe = Pipeline.from_checkpoint(vqgan_transformer, device="cpu", dtype="bf16")
    made = []
    new_cache = pipe.model.new_cache
    pipe.model.new_cache = lambda *a, **k: made.append(new_cache(*a, **k)) or made[-1]
    codes = pipe.sample_codes("a red circle", 3, seed=1)
    assert codes.shape == (3, 4, 4) and int(codes.min()) >= 0 and int(codes.max()) < 8
    assert len(made) == 1 and made[0].k[0].dtype == torch.bfloat16
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert made[0].autocast == torch.bfloat16 and made[0].step is not None
    assert next(pipe.model.parameters()).dtype == torch.float32  # the model itself is untouched


def test_generate_dtype_bf16_samples_under_autocast(vqgan_transformer, tmp_path, monkeypatch):
    """``t2i-generate dtype=bf16`` is Pipeline(dtype="bf16"): sampling under bfloat16 autocast through the
    bfloat16 cache and packed copies, the images decoded under it too; ``dtype=fp16`` on a CPU is one error."""
    from t2i.cli.generate import run
    from t2i.models.transformer import Transformer
    from tests.test_generate import generate_cfg

    made = []
    new_cache = Transformer.new_cache
    monkeypatch.setattr(Transformer, "new_cache", lambda self, *a, **k: made.append(new_cache(self, *a, **k)) or made[-1])
    base = [f"ckpt={vqgan_transformer}", "prompts=['a red circle']", "num_samples=2", "batch_size=2", "device=cpu"]
    out = run(generate_cfg(tmp_path / "bf16", *base, "dtype=bf16"))
    assert out["count"] == 2 and len(list((tmp_path / "bf16" / "gen").glob("p000_s*.png"))) == 2
    assert len(made) == 1 and made[0].k[0].dtype == torch.bfloat16
    run(generate_cfg(tmp_path / "fp32", *base))
    assert made[1].k[0].dtype == torch.float32 and made[1].autocast is None   # the default: float32, no autocast
    with pytest.raises(ConfigError, match=r"dtype=fp16 needs a GPU"):
        run(generate_cfg(tmp_path / "fp16", *base, "dtype=fp16"))
