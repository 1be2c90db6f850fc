"""Importers of public tokenizer weights (t2i.pretrained) against the original code.

The ``compat`` tests build reference models with random weights from the peer packages
(``taming-transformers-rom1504``, ``dall-e``: the ``compat`` extra), save them in the public formats and
check that our loaders reproduce their codes exactly and their reconstructions to ~1e-5. The error-message
tests need neither package.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from t2i.errors import T2IError
from t2i.models.vqgan import VQGAN
from t2i.pretrained import (
    load_openai_dvae,
    load_taming_vqgan,
    openai_dvae_config,
    save_openai_dvae_state,
    taming_vqgan_config,
)
from t2i.pretrained._pickle import inert_load

ATOL = 2e-5  # attention/conv summation order differs (SDPA vs bmm + softmax)

SMALL_DD = dict(double_z=False, z_channels=64, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 2],
                num_res_blocks=1, attn_resolutions=[16], dropout=0.0)

# The ImageNet f16-16384 VQGAN (the tokenizer EasyNLP's Chinese text-to-image models use), its model.yaml.
F16_16384_YAML = """\
model:
  base_learning_rate: 4.5e-06
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: 256
    n_embed: 16384
    monitor: val/rec_loss
    ddconfig:
      double_z: false
      z_channels: 256
      resolution: 256
      in_channels: 3
      out_ch: 3
      ch: 128
      ch_mult: [1, 1, 2, 2, 4]
      num_res_blocks: 2
      attn_resolutions: [16]
      dropout: 0.0
    lossconfig:
      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator
      params:
        disc_conditional: false
        disc_in_channels: 3
        disc_start: 0
        disc_weight: 0.75
        disc_num_layers: 2
        codebook_weight: 1.0
"""


def _images(b=3, size=32, seed=0):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _config(target="taming.models.vqgan.VQModel", dd=None, n_embed=64, embed_dim=16, **params):
    return {"model": {"base_learning_rate": 4.5e-6, "target": target,
                      "params": {"embed_dim": embed_dim, "n_embed": n_embed, "ddconfig": dict(dd or SMALL_DD),
                                 "lossconfig": {"target": "taming.modules.losses.vqperceptual.DummyLoss"},
                                 **params}}}


def _release(root: Path, config: dict, ckpt: dict) -> Path:
    """taming's release layout: configs/model.yaml + checkpoints/last.ckpt; returns the ckpt path."""
    (root / "configs").mkdir(parents=True)
    (root / "checkpoints").mkdir()
    OmegaConf.save(OmegaConf.create(config), root / "configs" / "model.yaml")
    torch.save(ckpt, root / "checkpoints" / "last.ckpt")
    return root / "checkpoints" / "last.ckpt"


class _Callback:  # stands for Lightning 1.x's ModelCheckpoint, the key of a taming ckpt's "callbacks"
    pass


class WrappedState(dict):
    """A dict subclass: its items come back only by full unpickling (needs this class)."""


class _RemoveOnLoad:
    """Unpickling this deletes ``path``: shows that a loader runs code from the file or not."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.remove, (self.path,)


# -- peer packages -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def taming():
    """taming.models.vqgan imported despite taming.main's Lightning 1.x import (stubbed for the import only)."""
    pytest.importorskip("taming", exc_type=ImportError, reason="taming-transformers-rom1504 not installed (pip install the compat extra)")
    name = "pytorch_lightning.utilities.distributed"
    stubbed = False
    try:
        importlib.import_module(name)
    except ImportError:
        from pytorch_lightning.utilities import rank_zero_only

        stub = types.ModuleType(name)
        stub.rank_zero_only = rank_zero_only
        sys.modules[name], stubbed = stub, True
    try:
        return importlib.import_module("taming.models.vqgan")
    finally:
        if stubbed:
            del sys.modules[name]


@pytest.fixture(scope="module")
def dall_e():
    return pytest.importorskip("dall_e", exc_type=ImportError, reason="dall-e not installed (pip install the compat extra)")


def _randomize_codebook(model):
    """taming initialises codes in +-1/n_embed; spread them so nearest-code search is not near-tied."""
    with torch.no_grad():
        for p in model.quantize.parameters():
            p.normal_(generator=torch.Generator().manual_seed(1))


# -- taming VQModel ------------------------------------------------------------------------------
@pytest.mark.compat
def test_taming_vqmodel_matches_original(taming, tmp_path):
    torch.manual_seed(0)
    cfg = _config()
    p = cfg["model"]["params"]
    ref = taming.VQModel(ddconfig=p["ddconfig"], lossconfig=p["lossconfig"], n_embed=64, embed_dim=16).eval()
    _randomize_codebook(ref)
    # Lightning 1.x layout: weights-only loading refuses the class used as a key of "callbacks"
    ckpt = _release(tmp_path, cfg, {"state_dict": ref.state_dict(), "epoch": 3, "global_step": 10,
                                    "callbacks": {_Callback: {"best_model_score": torch.tensor(0.5)}}})
    ours = load_taming_vqgan(ckpt)  # config found in ../configs/
    assert not ours.training and ours.codebook_size == 64 and ours.downsample == 4
    assert ours.config["quantizer"] == {"kind": "vq", "beta": 0.25, "legacy": True}

    x = _images()
    with torch.no_grad():
        _, _, (_, _, idx) = ref.encode(x)
        codes = ours.encode(x)
        assert codes.shape == (3, 8, 8) and codes.dtype == torch.long
        assert torch.equal(codes, idx.view(codes.shape))
        assert codes.unique().numel() > 5
        ref_dec = ref.decode(ref.quantize.get_codebook_entry(idx, (3, 8, 8, 16)))
        torch.testing.assert_close(ours.decode(codes), ref_dec.clamp(-1, 1), atol=ATOL, rtol=0)
        torch.testing.assert_close(ours(x)[0], ref(x)[0], atol=ATOL, rtol=0)


@pytest.mark.compat
def test_taming_gumbel_matches_original(taming, tmp_path):
    torch.manual_seed(0)
    sched = {"target": "taming.lr_scheduler.LambdaWarmUpCosineScheduler",
             "params": {"warm_up_steps": 0, "max_decay_steps": 1000, "lr_start": 0.9, "lr_max": 0.9,
                        "lr_min": 1.0e-6}}
    cfg = _config("taming.models.vqgan.GumbelVQ", embed_dim=64, kl_weight=1e-8, temperature_scheduler_config=sched)
    p = cfg["model"]["params"]
    ref = taming.GumbelVQ(ddconfig=p["ddconfig"], lossconfig=p["lossconfig"], n_embed=64, embed_dim=64,
                          temperature_scheduler_config=sched, kl_weight=1e-8).eval()
    _randomize_codebook(ref)
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"state_dict": ref.state_dict()}, run / "gumbel.ckpt")  # weights-only loadable
    OmegaConf.save(OmegaConf.create(cfg), run / "gumbel.yaml")  # config next to the ckpt
    ours = load_taming_vqgan(run / "gumbel.ckpt")
    assert ours.config["quantizer"]["kind"] == "gumbel" and ours.config["quantizer"]["kl_weight"] == 1e-8

    x = _images()
    with torch.no_grad():
        # taming's GumbelQuantize samples even in eval; the deterministic tokens are the argmax of its logits
        logits = ref.quantize.proj(ref.encode_to_prequant(x))
        codes = ours.encode(x)
        assert torch.equal(codes, logits.argmax(1))
        ref_dec = ref.decode(ref.quantize.get_codebook_entry(codes.flatten(), (3, 8, 8, 64)))
        torch.testing.assert_close(ours.decode(codes), ref_dec.clamp(-1, 1), atol=ATOL, rtol=0)


@pytest.mark.compat
def test_f16_16384_config_parses_and_matches_taming_layout(taming, tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text(F16_16384_YAML)
    kwargs = taming_vqgan_config(path)
    assert kwargs == dict(ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16], z_channels=256,
                          resolution=256, dropout=0.0, n_embed=16384, embed_dim=256,
                          quantizer={"kind": "vq", "beta": 0.25, "legacy": True})
    with torch.device("meta"):  # shapes only: no 90M-parameter allocation
        ours = VQGAN(**kwargs)
        cfg = OmegaConf.load(path).model.params
        ref = taming.VQModel(ddconfig=OmegaConf.to_container(cfg.ddconfig), n_embed=16384, embed_dim=256,
                             lossconfig={"target": "taming.modules.losses.vqperceptual.DummyLoss"})
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == theirs
    assert ours.downsample == 16 and ours.codebook_size == 16384
    assert sum(v.numel() for v in ours.parameters()) == sum(v.numel() for v in ref.parameters())


# -- OpenAI dVAE ---------------------------------------------------------------------------------
@pytest.mark.compat
def test_openai_dvae_matches_original(dall_e, tmp_path):
    torch.manual_seed(0)
    enc = dall_e.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512)
    dec = dall_e.Decoder(n_init=32, n_hid=64, n_blk_per_group=1, vocab_size=512)
    torch.save(enc, tmp_path / "encoder.pkl")  # the released format: whole pickled modules
    torch.save(dec, tmp_path / "decoder.pkl")
    ours = load_openai_dvae(tmp_path / "encoder.pkl", tmp_path / "decoder.pkl")
    expected = dict(n_hid=64, n_blk_per_group=1, vocab_size=512, group_count=4, input_channels=3, output_channels=3,
                    n_init=32)
    assert {k: ours.config[k] for k in expected} == expected
    assert not ours.training and ours.downsample == 8

    x01 = (_images(2, 64) + 1) / 2
    with torch.no_grad():
        ref_codes = enc(dall_e.map_pixels(x01)).argmax(1)
        codes = ours.encode(x01 * 2 - 1)
        assert torch.equal(codes, ref_codes) and codes.unique().numel() > 5
        z = F.one_hot(ref_codes, 512).permute(0, 3, 1, 2).float()
        ref_img = dall_e.unmap_pixels(torch.sigmoid(dec(z)[:, :3].float()))
        torch.testing.assert_close((ours.decode(codes) + 1) / 2, ref_img, atol=ATOL, rtol=0)

    # converted once to weights-only files, which load without any pickled object
    enc_pt, dec_pt = save_openai_dvae_state(tmp_path / "encoder.pkl", tmp_path / "decoder.pkl", tmp_path / "conv")
    assert set(torch.load(enc_pt, weights_only=True)) == set(enc.state_dict())
    again = load_openai_dvae(enc_pt, dec_pt)
    for a, b in zip(again.state_dict().values(), ours.state_dict().values()):
        assert torch.equal(a, b)
    # full unpickling (opt-in) gives the same weights
    trusted = load_openai_dvae(tmp_path / "encoder.pkl", tmp_path / "decoder.pkl", trust_pickle=True)
    assert all(torch.equal(a, b) for a, b in zip(trusted.state_dict().values(), ours.state_dict().values()))


def test_openai_dvae_config_from_our_weights_and_swapped_files(tmp_path):
    from t2i.models.dvae import DVAE

    model = DVAE(n_hid=16, n_blk_per_group=2, vocab_size=64, group_count=3, n_init=8)
    enc, dec = model.encoder.state_dict(), model.decoder.state_dict()
    inferred = openai_dvae_config(enc, dec)
    assert inferred == {k: model.config[k] for k in inferred} and len(inferred) == 7
    torch.save(enc, tmp_path / "e.pt")
    torch.save(dec, tmp_path / "d.pt")
    with pytest.raises(T2IError, match="swapped"):
        load_openai_dvae(tmp_path / "d.pt", tmp_path / "e.pt")
    with pytest.raises(T2IError, match="no such file"):
        load_openai_dvae(tmp_path / "missing.pkl", tmp_path / "d.pt")
    # whole pickled modules (like the released files) are read without importing their classes
    torch.save(model.encoder, tmp_path / "e.pkl")
    torch.save(model.decoder, tmp_path / "d.pkl")
    again = load_openai_dvae(tmp_path / "e.pkl", tmp_path / "d.pkl")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    torch.save(model.state_dict(), tmp_path / "whole.pt")  # a whole DVAE state dict is not a dall_e file
    with pytest.raises(T2IError, match=r"no weights in the expected layout \(a mapping with keys \['decoder\.blocks"):
        load_openai_dvae(tmp_path / "whole.pt", tmp_path / "d.pt")


# -- errors (no peer package needed) ----------------------------------------------------------------
def _our_taming_state(**kw) -> dict:
    """A taming-format state dict from our VQGAN (same names) plus loss entries."""
    model = VQGAN(ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[16], z_channels=64, embed_dim=16,
                  n_embed=64, resolution=32, quantizer={"kind": "vq", "legacy": True}, **kw)
    state = dict(model.state_dict())
    state["loss.discriminator.main.0.weight"] = torch.zeros(8, 3, 4, 4)
    return state


def test_taming_missing_config_names_where_it_looked(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    torch.save({"state_dict": _our_taming_state()}, tmp_path / "checkpoints" / "last.ckpt")
    with pytest.raises(T2IError, match=r"no model config.*checkpoints.*configs.*t2i-import taming: config=; a tokenizer spec: files.config"):
        load_taming_vqgan(tmp_path / "checkpoints" / "last.ckpt")
    with pytest.raises(T2IError, match="no such file"):
        load_taming_vqgan(tmp_path / "checkpoints" / "last.ckpt", tmp_path / "nope.yaml")


def test_taming_without_taming_package_loads_and_ignores_loss(tmp_path):
    state = _our_taming_state()
    ckpt = _release(tmp_path, _config(), {"state_dict": state})
    model = load_taming_vqgan(ckpt)
    assert torch.equal(model.quantize.embedding.weight, state["quantize.embedding.weight"])


def test_taming_remap_and_unsupported_configs_are_clear(tmp_path):
    remap = _config(remap="data/vq_remap.npy")
    with pytest.raises(T2IError, match="remapped codebooks .* not supported"):
        taming_vqgan_config(remap)
    with pytest.raises(T2IError, match="not supported; t2i imports"):
        taming_vqgan_config(_config("taming.models.cond_transformer.Net2NetTransformer"))
    with pytest.raises(T2IError, match="double_z=True is not supported"):
        taming_vqgan_config(_config(dd={**SMALL_DD, "double_z": True}))
    with pytest.raises(T2IError, match="GumbelVQ with embed_dim=16 != z_channels=64"):
        taming_vqgan_config(_config("taming.models.vqgan.GumbelVQ"))
    state = _our_taming_state()
    state["quantize.used"] = torch.arange(64)
    ckpt = _release(tmp_path, _config(), {"state_dict": state})
    with pytest.raises(T2IError, match="remapped codebook"):
        load_taming_vqgan(ckpt)
    bad = _release(tmp_path / "b", _config(n_embed=128), {"state_dict": _our_taming_state()})
    with pytest.raises(T2IError, match="does not match its config"):
        load_taming_vqgan(bad)


def test_pickled_objects_need_opt_in_and_inert_loading_runs_no_code(tmp_path):
    state = _our_taming_state()
    victim = tmp_path / "victim.txt"
    victim.write_text("still here")
    # extra objects next to the weights: read without running them
    ckpt = _release(tmp_path / "a", _config(), {"state_dict": state, "payload": _RemoveOnLoad(victim)})
    with pytest.raises(Exception):  # noqa: B017  (torch's own refusal)
        torch.load(ckpt, weights_only=True)
    load_taming_vqgan(ckpt)
    assert victim.exists()
    assert "opaque" in repr(inert_load(ckpt)["payload"])
    # weights inside a custom object: only full unpickling recovers them -> explicit opt-in
    wrapped = _release(tmp_path / "b", _config(), {"state_dict": WrappedState(state)})
    with pytest.raises(T2IError, match=r"trust_pickle=True.*arbitrary code|arbitrary code.*trust_pickle=True"):
        load_taming_vqgan(wrapped)
    model = load_taming_vqgan(wrapped, trust_pickle=True)
    assert torch.equal(model.quantize.embedding.weight, state["quantize.embedding.weight"])
    trusted = _release(tmp_path / "c", _config(), {"state_dict": WrappedState(state), "payload": _RemoveOnLoad(victim)})
    load_taming_vqgan(trusted, trust_pickle=True)
    assert not victim.exists()  # what trust_pickle=True risks


def test_not_a_torch_file(tmp_path):
    (tmp_path / "configs").mkdir()
    OmegaConf.save(OmegaConf.create(_config()), tmp_path / "configs" / "model.yaml")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "last.ckpt").write_text("not a checkpoint")
    with pytest.raises(T2IError, match="cannot be read"):
        load_taming_vqgan(tmp_path / "x" / "last.ckpt")
