"""Artifacts travel: public image tokenizers (taming VQModel, OpenAI's dVAE) through t2i-tokenize ->
t2i-train (image logging and the metrics callback on) -> t2i-generate -> t2i-eval; the transformer
checkpoint carries its image tokenizer; code folders keep their text and image tokenizers when moved."""

import os
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from t2i.cli.train import train
from t2i.data.codes import read_manifest
from t2i.errors import T2IError
from t2i.keys import IMAGE_TOKENIZER_KEY
from t2i.models.dvae import DVAE
from t2i.models.records import tokenizer_record
from t2i.models.vqgan import VQGAN
from t2i.pretrained import load_openai_dvae, load_taming_vqgan
from t2i.pretrained.image_tokenizers import load_tokenizer
from tests.test_pretrained import taming  # noqa: F401 (the fixture: taming.models.vqgan)
from tests.test_tokenize import SHAPES, tok_cfg
from tests.test_transformer_train import compose_transformer, generate_cfg

GM = "callbacks.generation_metrics"
TINY = "{_target_:tests.test_eval.TinyFeatures}"
TINY_IS = "{_target_:tests.test_eval.TinyFeatures,num_features:10,seed:1}"
# a taming VQModel at the smallest size taming's GroupNorm(32) allows: 16 px -> 4x4 codes of 32
TAMING_DD = dict(double_z=False, z_channels=32, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 2],
                 num_res_blocks=1, attn_resolutions=[], dropout=0.0)


def taming_release(root: Path, vqgan_module) -> Path:
    """A random-weight taming VQModel (``vqgan_module``: taming.models.vqgan) in taming's release layout
    (configs/model.yaml + checkpoints/last.ckpt, which also pickles a non-tensor object as Lightning 1.x did)."""
    params = {"ddconfig": TAMING_DD, "n_embed": 32, "embed_dim": 8,
              "lossconfig": {"target": "taming.modules.losses.vqperceptual.DummyLoss"}}
    torch.manual_seed(0)
    model = vqgan_module.VQModel(**params)
    with torch.no_grad():  # spread the codes so nearest-code search uses many of them
        model.quantize.embedding.weight.normal_(generator=torch.Generator().manual_seed(1))
    (root / "configs").mkdir(parents=True)
    (root / "checkpoints").mkdir()
    OmegaConf.save(OmegaConf.create({"model": {"target": "taming.models.vqgan.VQModel", "params": params}}),
                   root / "configs" / "model.yaml")
    torch.save({"state_dict": model.state_dict(), "callbacks": {Path: {"best": 0.0}}}, root / "checkpoints" / "last.ckpt")
    return root / "checkpoints" / "last.ckpt"


def dvae_release(root: Path) -> tuple[Path, Path]:
    """A random-weight dVAE as the dall_e package ships it: whole pickled encoder / decoder modules."""
    root.mkdir(parents=True)
    torch.manual_seed(0)
    model = DVAE(n_hid=16, n_blk_per_group=1, vocab_size=32, group_count=3, n_init=8)
    torch.save(model.encoder, root / "encoder.pkl")
    torch.save(model.decoder, root / "decoder.pkl")
    return root / "encoder.pkl", root / "decoder.pkl"


def transformer_cfg(run: Path, codes, *overrides, metrics: bool = True):
    """A 2-layer transformer for 1 epoch (4 steps) with the image logger (default callbacks) and, with
    ``metrics``, the GenerationMetrics callback (tiny random feature extractors) at its validation."""
    extra = ["callbacks=metrics", f"{GM}.num_captions=6", f"{GM}.batch_size=3", f"{GM}.metrics.extractor={TINY}",
             f"{GM}.metrics.is_extractor={TINY_IS}", f"{GM}.metrics.is_splits=2",
             f"{GM}.metrics.cache_dir={run}/cache"] if metrics else []
    return compose_transformer(run, codes, "data.batch_size=8", "trainer.max_epochs=1", "model.warmup_steps=1",
                               "model.model.n_layer=1", "model.model.d_model=32", "model.sample.num_captions=4",
                               "data.num_workers=0", *extra, *overrides)


def generate(tmp: Path, ckpt, *overrides) -> list[Path]:
    from t2i.cli.generate import run

    result = run(generate_cfg(tmp, f"ckpt={ckpt}", "prompts=['一个大的红色圆形在左上角']", "num_samples=2", "batch_size=2",
                              *overrides))
    return sorted(Path(result["output"]).glob("p000_s*.png"))


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# -- the whole chain with a public taming VQGAN --------------------------------------------------------------
def test_taming_tokenizer_through_tokenize_train_generate_eval(tmp_path, taming):  # noqa: F811
    from t2i.cli.evaluate import run as evaluate
    from t2i.cli.tokenize import run as tokenize
    from tests.test_eval import eval_cfg

    ckpt = taming_release(tmp_path / "vqgan", taming)
    tokenize(tok_cfg(tmp_path, "tokenizer_kind=taming", f"tokenizer_ckpt={ckpt}", f"output={tmp_path}/codes", *SHAPES))
    metrics, obj = train(transformer_cfg(tmp_path, tmp_path / "codes"))
    manifest = read_manifest(tmp_path / "codes")
    assert manifest["grid"] == [4, 4] and manifest["codebook_size"] == 32
    assert manifest["image_tokenizer"]["files"]["config"] == str((tmp_path / "vqgan/configs/model.yaml").resolve())
    assert {"val/fid", "val/is_mean", "val/image_loss"} <= set(metrics)
    assert list((tmp_path / "run" / "images").glob("val_epoch000_samples.png"))
    assert list((tmp_path / "run" / "images").glob("val_epoch000_generations.png"))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved[IMAGE_TOKENIZER_KEY]["target"] == "t2i.models.vqgan.VQGAN"
    original = load_taming_vqgan(ckpt)
    carried = load_tokenizer(last)  # the transformer checkpoint alone rebuilds the tokenizer
    assert same_weights(carried, original) and carried.config == original.config

    assert len(generate(tmp_path, last)) == 2
    spec = f"{{kind:taming,files:{{ckpt:{ckpt},config:{ckpt.parent.parent}/configs/model.yaml}}}}"
    assert len(generate(tmp_path / "override", last, f"image_tokenizer={spec}")) == 2  # the override, as typed
    result = evaluate(eval_cfg(tmp_path / "eval", "eval=shapes", f"ckpt={last}", "eval.num_captions=4",
                               "eval.num_candidates=1", "batch_size=4", "metrics.extractor=null",
                               "metrics.inception_score=false", "metrics.clip_score=false", "metrics.fd_clip=false"))
    assert 0 <= result["summary"]["acc_first"] <= 1 and result["protocol"]["image_size"] == 16


# -- moved folders ------------------------------------------------------------------------------------------
def test_moved_tokenizer_codes_and_data_still_train_and_generate(tmp_path, monkeypatch, taming):  # noqa: F811
    """Tokenize with paths relative to the working folder (as a user types them), move the tokenizer, the code
    shards and the data folder elsewhere, work from a third folder: training and generation still work."""
    from t2i.cli.tokenize import run as tokenize

    made, moved, elsewhere = tmp_path / "made", tmp_path / "moved", tmp_path / "elsewhere"
    ckpt = taming_release(made / "vqgan", taming)
    made.joinpath("run").mkdir()
    monkeypatch.chdir(made)
    tokenize(tok_cfg(Path("."), "tokenizer_kind=taming", "tokenizer_ckpt=vqgan/checkpoints/last.ckpt",
                     "output=codes", *SHAPES))
    assert read_manifest(made / "codes")["data"]["tokenizer"].startswith("./data/")  # as written
    moved.mkdir()
    for name in ("vqgan", "codes", "data"):
        shutil.move(str(made / name), str(moved / name))
    assert not ckpt.exists()
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    _, obj = train(transformer_cfg(tmp_path / "train", moved / "codes", metrics=False))
    files = obj["model"].hparams.image_tokenizer["files"]
    assert files["ckpt"] == str((moved / "vqgan/checkpoints/last.ckpt").resolve())  # found beside the codes
    assert list((tmp_path / "train" / "run" / "images").glob("val_epoch000_samples.png"))
    last = tmp_path / "train" / "run" / "checkpoints" / "last.ckpt"
    shutil.rmtree(moved)  # the transformer checkpoint alone: tokenizers, data and codes gone
    images = generate(tmp_path, last)
    assert len(images) == 2 and all(p.stat().st_size > 0 for p in images)
    from t2i.lit.transformer import TransformerModule

    assert TransformerModule.load_from_checkpoint(last).image_tokenizer.codebook_size == 32
    assert os.getcwd() == str(elsewhere)


def test_moved_code_folder_keeps_its_text_tokenizer_and_names_the_override(tmp_path, monkeypatch):
    """Fast: a code folder made with relative paths works from anywhere; a tokenizer that is gone or
    changed gives one error naming the override (model.image_tokenizer= / data.tokenizer=)."""
    from t2i.cli.tokenize import run as tokenize
    from t2i.data.code_datamodule import CodesDataModule, stage2_info
    from tests.toy_tokenizer import save_checkpoint

    made = tmp_path / "made"
    made.mkdir()
    monkeypatch.chdir(made)
    save_checkpoint(made / "tok.ckpt", downsample=4, levels=4)
    tokenize(tok_cfg(Path("."), "tokenizer_ckpt=tok.ckpt", "output=codes", *SHAPES))
    shutil.move(str(made / "codes"), str(tmp_path / "codes"))
    shutil.move(str(made / "data"), str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    dm = CodesDataModule(str(tmp_path / "codes"))  # the copy beside the manifest
    assert (tmp_path / "codes" / "text_tokenizer.json").is_file()
    info = stage2_info(str(tmp_path / "codes"), image_tokenizer=False)
    assert info["text_vocab"] == dm.tokenizer.vocab_size and info["image_grid"] == [4, 4]
    (tmp_path / "other").mkdir()
    shutil.move(str(made / "tok.ckpt"), str(tmp_path / "other" / "tok.ckpt"))  # neither where it was nor beside
    with pytest.raises(T2IError, match=r"no such file \(was it moved\?\); pass model\.image_tokenizer="):
        stage2_info(str(tmp_path / "codes"))
    shutil.move(str(tmp_path / "other" / "tok.ckpt"), str(tmp_path / "tok.ckpt"))  # where the relative path points
    assert stage2_info(str(tmp_path / "codes"))["image_tokenizer"]["files"]["ckpt"] == str(tmp_path / "tok.ckpt")
    save_checkpoint(tmp_path / "tok.ckpt", downsample=4, levels=5)  # a different tokenizer at that path
    with pytest.raises(T2IError, match=r"sha256 .* recorded when its codes were made.*model\.image_tokenizer="):
        stage2_info(str(tmp_path / "codes"))
    from t2i.lit.transformer import TransformerModule

    with pytest.raises(T2IError, match="has 125 codes; the transformer is set up for 64"):  # at once, not at validation
        TransformerModule(model=dict(text_len=4, n_layer=1, n_head=2, d_model=16), codes=str(tmp_path / "codes"),
                          image_tokenizer=str(tmp_path / "tok.ckpt"))
    (tmp_path / "codes" / "text_tokenizer.json").unlink()
    shutil.rmtree(tmp_path / "data")
    with pytest.raises(T2IError, match=r"text tokenizer .* no longer exists .*set data\.tokenizer="):
        CodesDataModule(str(tmp_path / "codes"))


# -- OpenAI's dVAE --------------------------------------------------------------------------------------
def test_openai_dvae_through_tokenize_train_generate(tmp_path):
    from t2i.cli.tokenize import run as tokenize

    enc, dec = dvae_release(tmp_path / "dalle")
    tokenize(tok_cfg(tmp_path, "tokenizer_kind=openai_dvae", f"tokenizer_ckpt={enc}", f"tokenizer_decoder={dec}",
                     f"output={tmp_path}/codes", *SHAPES))
    train(transformer_cfg(tmp_path, tmp_path / "codes", metrics=False))  # the image logger decodes at validation
    assert list((tmp_path / "run" / "images").glob("val_epoch000_samples.png"))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert same_weights(load_tokenizer(last), load_openai_dvae(enc, dec))
    shutil.rmtree(tmp_path / "dalle")
    assert len(generate(tmp_path, last)) == 2


# -- records and the RNG ---------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda: VQGAN(ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], z_channels=32, embed_dim=8, n_embed=16,
                  resolution=16, quantizer={"kind": "gumbel", "kl_weight": 1e-8}),
    lambda: VQGAN(ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], z_channels=32, embed_dim=8, n_embed=16,
                  resolution=16, quantizer={"kind": "vq", "legacy": True}),
    lambda: DVAE(n_hid=16, n_blk_per_group=1, vocab_size=16, group_count=2, n_init=8),
], ids=["gumbel", "vq", "dvae"])
def test_tokenizer_record_rebuilds_every_kind(make, tmp_path):
    model = make().eval()
    record = tokenizer_record(model)
    torch.save({IMAGE_TOKENIZER_KEY: record, "state_dict": {}}, tmp_path / "carrier.ckpt")
    again = load_tokenizer(tmp_path / "carrier.ckpt")  # weights_only load of a carried entry
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(again.encode(x), model.encode(x))
        assert torch.equal(again.decode(model.encode(x)), model.decode(model.encode(x)))
    assert same_weights(again, model) and tokenizer_record(again)["config"] == record["config"]


def test_building_the_image_tokenizer_leaves_the_global_rng_alone(tmp_path):
    """issue 17: the tokenizer is built lazily (first validation); doing so must not draw from the global RNG,
    or a resumed run (which builds it at another moment) diverges. Then it travels with the checkpoint."""
    from t2i.keys import TOKENIZER_KEY
    from t2i.lit.transformer import TransformerModule
    from t2i.models.records import tokenizer_entry

    vqgan = VQGAN(ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], z_channels=32, embed_dim=8, n_embed=16,
                  resolution=16)
    torch.save({"state_dict": {f"model.{k}": v for k, v in vqgan.state_dict().items()},
                TOKENIZER_KEY: tokenizer_entry("t2i.models.vqgan.VQGAN", vqgan.config)}, tmp_path / "vqgan.ckpt")
    module = TransformerModule(model=dict(text_vocab=10, text_pad_id=0, image_vocab=16, image_grid=[4, 4], text_len=4,
                                          n_layer=1, n_head=2, d_model=16), image_tokenizer=str(tmp_path / "vqgan.ckpt"))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    tok = module.image_tokenizer
    assert tok.codebook_size == 16 and torch.equal(torch.get_rng_state(), state)
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    (tmp_path / "vqgan.ckpt").unlink()
    assert same_weights(load_tokenizer(checkpoint[IMAGE_TOKENIZER_KEY]), vqgan)


def test_public_weights_given_as_a_t2i_checkpoint_name_the_setting_that_fixes_it(tmp_path, taming):  # noqa: F811
    from t2i.cli.tokenize import run as tokenize

    ckpt = taming_release(tmp_path / "vqgan", taming)
    with pytest.raises(T2IError, match=r"cannot be read .*set tokenizer_kind=taming \(and tokenizer_config="):
        tokenize(tok_cfg(tmp_path, f"tokenizer_ckpt={ckpt}", f"output={tmp_path}/codes", *SHAPES))
    with pytest.raises(T2IError, match=r"pass image_tokenizer='\{kind: taming, files: \{ckpt: "):
        load_tokenizer(ckpt, key="image_tokenizer")


def test_a_checkpoint_cannot_name_an_arbitrary_callable(tmp_path):
    """The carried record names the class to build; anything but an nn.Module class is refused by name."""
    record = {"target": "os.system", "config": {"command": "true"}, "state_dict": {}}
    with pytest.raises(T2IError, match="not an nn.Module class"):
        load_tokenizer(record)
    path = tmp_path / "evil.ckpt"
    torch.save({IMAGE_TOKENIZER_KEY: record}, path)
    with pytest.raises(T2IError, match="not an nn.Module class"):
        load_tokenizer(path)
    with pytest.raises(T2IError, match="cannot be imported"):
        load_tokenizer({**record, "target": "t2i.models.vqgan.NoSuchModel"})
