"""VQGAN encoder/decoder/model (shapes, taming key names, errors) and the PatchGAN discriminator."""

from __future__ import annotations

import json

import pytest
import torch

from t2i.models.discriminator import ActNorm, NLayerDiscriminator
from t2i.models.quantizers import GumbelQuantizer
from t2i.models.records import build
from t2i.models.vqgan import VQGAN

SMALL = dict(ch=32, num_res_blocks=1, z_channels=8, embed_dim=4, n_embed=16)


@pytest.mark.parametrize("ch_mult,resolution,attn", [((1, 2, 2), 32, (8,)), ((1, 1, 2, 2), 64, (8,)),
                                                    ((1, 1, 2, 2, 4), 64, (4,))])
def test_encode_decode_shapes(ch_mult, resolution, attn):
    torch.manual_seed(0)
    model = VQGAN(ch_mult=ch_mult, resolution=resolution, attn_resolutions=attn, **SMALL).eval()
    f = 2 ** (len(ch_mult) - 1)
    assert model.downsample == f and model.codebook_size == 16
    x = torch.rand(2, 3, resolution, resolution) * 2 - 1
    codes = model.encode(x)
    assert codes.shape == (2, resolution // f, resolution // f) and codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < 16
    y = model.decode(codes)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    rec, qloss, info = model(x)
    assert rec.shape == x.shape and qloss.ndim == 0
    assert torch.equal(info["codes"], codes) and "perplexity" in info
    torch.testing.assert_close(rec.clamp(-1, 1), y, atol=1e-4, rtol=0)  # forward = decode without the clamp
    # non-square inputs work as long as both sides are multiples of f
    assert model.encode(torch.zeros(1, 3, 2 * f, 3 * f)).shape == (1, 2, 3)


def test_non_divisible_size_error():
    model = VQGAN(ch_mult=(1, 2, 2), resolution=32, attn_resolutions=(), **SMALL)
    with pytest.raises(ValueError, match=r"30x32 is not divisible by the downsampling factor 4"):
        model.encode(torch.zeros(1, 3, 30, 32))


def _expected_taming_keys(ch_mult, num_res_blocks, attn_levels, quantizer="vq"):
    """Key names following taming's Encoder/Decoder/VQModel construction, written out independently."""
    def resnet(prefix, shortcut):
        names = ["norm1", "conv1", "norm2", "conv2"] + (["nin_shortcut"] if shortcut else [])
        return [f"{prefix}.{n}.{p}" for n in names for p in ("weight", "bias")]

    def attn(prefix):
        return [f"{prefix}.{n}.{p}" for n in ("norm", "q", "k", "v", "proj_out") for p in ("weight", "bias")]

    def conv(prefix):
        return [f"{prefix}.weight", f"{prefix}.bias"]

    keys, n = [], len(ch_mult)
    keys += conv("encoder.conv_in")
    prev = 1
    for i, m in enumerate(ch_mult):
        for j in range(num_res_blocks):
            keys += resnet(f"encoder.down.{i}.block.{j}", shortcut=(j == 0 and prev != m))
            if i in attn_levels:
                keys += attn(f"encoder.down.{i}.attn.{j}")
        if i != n - 1:
            keys += conv(f"encoder.down.{i}.downsample.conv")
        prev = m
    for part in ("encoder", "decoder"):
        keys += resnet(f"{part}.mid.block_1", False) + attn(f"{part}.mid.attn_1") + resnet(f"{part}.mid.block_2", False)
        keys += conv(f"{part}.norm_out") + conv(f"{part}.conv_out")
    keys += conv("decoder.conv_in")
    prev = ch_mult[-1]
    for i in reversed(range(n)):
        for j in range(num_res_blocks + 1):
            keys += resnet(f"decoder.up.{i}.block.{j}", shortcut=(j == 0 and prev != ch_mult[i]))
            if i in attn_levels:
                keys += attn(f"decoder.up.{i}.attn.{j}")
        if i != 0:
            keys += conv(f"decoder.up.{i}.upsample.conv")
        prev = ch_mult[i]
    keys += conv("quant_conv") + conv("post_quant_conv")
    keys += ["quantize.embedding.weight"] if quantizer == "vq" else conv("quantize.proj") + ["quantize.embed.weight"]
    return set(keys)


@pytest.mark.parametrize("quantizer", ["vq", "gumbel"])
def test_taming_key_names_and_shapes(quantizer):
    cfg = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(8,), z_channels=8, embed_dim=8,
               n_embed=16, resolution=32, quantizer={"kind": quantizer})
    sd = VQGAN(**cfg).state_dict()
    assert set(sd) == _expected_taming_keys((1, 2, 2), 2, attn_levels={2}, quantizer=quantizer)
    for key in ("encoder.conv_in.weight", "encoder.down.0.block.0.norm1.weight", "encoder.mid.attn_1.q.weight",
                "decoder.up.0.block.0.conv1.weight", "quant_conv.weight", "post_quant_conv.weight",
                "decoder.conv_out.weight"):
        assert key in sd
    shapes = {"encoder.conv_in.weight": (32, 3, 3, 3), "encoder.down.1.block.0.nin_shortcut.weight": (64, 32, 1, 1),
              "encoder.down.0.downsample.conv.weight": (32, 32, 3, 3), "encoder.conv_out.weight": (8, 64, 3, 3),
              "decoder.conv_in.weight": (64, 8, 3, 3), "decoder.up.0.block.0.nin_shortcut.weight": (32, 64, 1, 1),
              "decoder.up.2.attn.2.q.weight": (64, 64, 1, 1), "decoder.up.1.upsample.conv.weight": (64, 64, 3, 3),
              "decoder.conv_out.weight": (3, 32, 3, 3), "quant_conv.weight": (8, 8, 1, 1)}
    if quantizer == "vq":
        shapes["quantize.embedding.weight"] = (16, 8)
    else:
        shapes.update({"quantize.proj.weight": (16, 8, 1, 1), "quantize.embed.weight": (16, 8)})
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes


def test_config_round_trip_and_last_layer():
    model = VQGAN(ch_mult=(1, 2, 2), resolution=32, attn_resolutions=(8,),
                  quantizer={"kind": "vq", "beta": 0.5, "legacy": True}, **SMALL)
    config = json.loads(json.dumps(model.config))  # plain JSON types only
    clone = build("t2i.models.vqgan.VQGAN", config)
    clone.load_state_dict(model.state_dict())
    assert clone.quantize.beta == 0.5 and clone.quantize.legacy
    assert model.last_layer is model.decoder.conv_out.weight
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(model.eval().encode(x), clone.eval().encode(x))


def test_gumbel_vqgan_and_bad_quantizer():
    model = VQGAN(ch_mult=(1, 2), resolution=16, attn_resolutions=(), quantizer={"kind": "gumbel", "temperature": 0.9},
                  **SMALL).eval()
    assert model.quantize.temperature == 0.9
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    codes = model.encode(x)
    assert torch.equal(codes, model(x)[2]["codes"])
    assert model.decode(codes).shape == x.shape
    with pytest.raises(ValueError, match="kind 'fsq' is unknown"):
        VQGAN(quantizer={"kind": "fsq"}, **SMALL)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['betta'\]"):
        VQGAN(quantizer={"kind": "gumbel", "betta": 0.25}, **SMALL)
    # VQ keys left over from the default config (Hydra merges dicts) are ignored for gumbel
    merged = VQGAN(quantizer={"kind": "gumbel", "beta": 0.25, "legacy": False, "ema_decay": None, "kl_weight": 0.1},
                   **SMALL)
    assert isinstance(merged.quantize, GumbelQuantizer) and merged.quantize.kl_weight == 0.1
    with pytest.raises(ValueError, match="divisible by 32"):
        VQGAN(ch=24, ch_mult=(1, 2))


def test_training_gradients_reach_encoder_and_codebook():
    torch.manual_seed(0)
    model = VQGAN(ch_mult=(1, 2), resolution=16, attn_resolutions=(8,), **SMALL).train()
    rec, qloss, _ = model(torch.rand(2, 3, 16, 16) * 2 - 1)
    (rec.pow(2).mean() + qloss).backward()
    for name in ("encoder.conv_in.weight", "quantize.embedding.weight", "decoder.conv_out.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


@pytest.mark.parametrize("size,grid", [(32, 2), (64, 6), (256, 30)])
def test_discriminator_patch_grid(size, grid):
    d = NLayerDiscriminator(ndf=8, n_layers=3)
    assert d(torch.randn(2, 3, size, size)).shape == (2, 1, grid, grid)


def test_discriminator_layout_and_init():
    torch.manual_seed(0)
    d = NLayerDiscriminator()
    sd = d.state_dict()
    assert tuple(sd["main.0.weight"].shape) == (64, 3, 4, 4) and "main.2.bias" not in sd  # no bias before BN
    assert tuple(sd["main.8.weight"].shape) == (512, 256, 4, 4) and "main.9.running_mean" in sd
    assert tuple(sd["main.11.weight"].shape) == (1, 512, 4, 4)
    assert abs(sd["main.8.weight"].std().item() - 0.02) < 1e-3
    assert abs(sd["main.3.weight"].mean().item() - 1.0) < 0.01 and sd["main.3.bias"].abs().sum() == 0
    a = NLayerDiscriminator(norm="actnorm").state_dict()
    assert {"main.2.bias", "main.3.loc", "main.3.scale", "main.3.initialized"} <= set(a)
    with pytest.raises(ValueError, match="norm must be"):
        NLayerDiscriminator(norm="instance")


def test_actnorm_data_dependent_init():
    torch.manual_seed(0)
    norm = ActNorm(4)
    x = torch.randn(8, 4, 5, 5) * torch.tensor([1.0, 2.0, 3.0, 0.5]).view(1, 4, 1, 1) + 3.0
    y = norm(x)
    assert norm.initialized.item() == 1
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(dim=(0, 2, 3)), torch.ones(4), atol=1e-4, rtol=0)
    loc = norm.loc.clone()
    norm(x * 5)  # later batches do not re-initialise
    assert torch.equal(norm.loc, loc)
    fresh = ActNorm(4).eval()
    assert torch.equal(fresh(x), x) and fresh.initialized.item() == 0  # eval never initialises
