"""TransformerModule end to end: Shapes -> code shards (toy tokenizer) -> t2i-train experiment=shapes_transformer."""

import json
import math
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_module
from PIL import Image

from t2i.cli.train import train
from t2i.data.codes import load_codes
from t2i.errors import ConfigError, T2IError
from t2i.lit.transformer import TransformerModule
from t2i.sampling import generate
from tests.test_tokenize import tokenize
from tests.toy_tokenizer import save_checkpoint


@pytest.fixture(scope="module")
def codes(tmp_path_factory):
    """Shapes at 16 px as 4x4 grids of 64 codes (colour of each 4x4 patch), 400 training images."""
    tmp = tmp_path_factory.mktemp("codes")
    ckpt = tmp / "tok.ckpt"
    save_checkpoint(ckpt, downsample=4, levels=4)
    tokenize(tmp, ckpt, "data.shapes.n_train=400", "data.shapes.n_val=64", "data.shapes.n_test=32")
    return tmp / "codes"


def compose_transformer(tmp_path, codes, *overrides):
    with initialize_config_module("t2i.conf", version_base="1.3"):
        return compose("train", overrides=[
            "experiment=shapes_transformer", "logger=csv", f"paths.output_dir={tmp_path}/run",
            f"paths.data_dir={tmp_path}/data", f"data.codes={codes}", "data.batch_size=32",
            "model.model.n_layer=2", "model.model.d_model=64", "model.model.n_head=2",
            "model.ema_decay=null", "trainer.precision=32-true", "callbacks.rich_summary=null", "trainer.enable_progress_bar=false", *overrides])


def unigram_entropy(codes: torch.Tensor, vocab: int) -> float:
    """Cross-entropy (nats) of the best context-free model: the code frequencies themselves."""
    p = torch.bincount(codes.flatten(), minlength=vocab).float()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())


def test_fast_dev_run(tmp_path, codes):
    metrics, obj = train(compose_transformer(tmp_path, codes, "debug=fdr"))
    assert {"train/loss", "train/image_loss", "train/text_loss", "val/image_bits_per_token", "test/loss"} <= set(metrics)
    h = obj["model"].hparams
    assert h.model["image_grid"] == [4, 4] and h.model["image_vocab"] == 64  # read from the manifest
    assert h.model["text_vocab"] == obj["datamodule"].tokenizer.vocab_size


@pytest.fixture(scope="module")
def trained(tmp_path_factory, codes):
    tmp = tmp_path_factory.mktemp("trained")
    cfg = compose_transformer(tmp, codes, "trainer.max_epochs=25", "model.warmup_steps=20", "model.lr=3e-3",
                              "model.ema_decay=0.9")
    metrics, obj = train(cfg)
    return tmp, metrics, obj


def test_shapes_transformer_learns_and_samples(trained, codes):
    """A few hundred steps: validation image loss far below the unigram baseline; the checkpoint
    rebuilds the model alone, and samples decode through the codes' own image tokenizer."""
    tmp_path, metrics, obj = trained
    _, val_codes, _ = load_codes(codes, "val")
    baseline = unigram_entropy(val_codes, 64)
    assert obj["trainer"].global_step >= 250
    assert metrics["val/image_loss"] < 0.6 * baseline, (metrics["val/image_loss"], baseline)
    ckpt = obj["trainer"].checkpoint_callback.best_model_path
    module = TransformerModule.load_from_checkpoint(ckpt)  # no data config needed
    assert module.ema is not None
    batch = next(iter(obj["datamodule"].val_dataloader()))
    images = module.log_images(batch)
    picture = images["samples"]  # 16 rows of caption | sample | reference
    assert picture.shape[:2] == (1, 3) and picture.shape[2] >= 16 * 16 and picture.shape[3] > 2 * 16
    assert list((tmp_path / "run" / "images").glob("val_epoch*_samples.png"))
    # sampled codes follow the caption: with greedy decoding most cells match the ground truth
    codes_hat = generate(module.sampling_model(), batch["text"][:32], temperature=0.0)
    agree = (codes_hat == batch["codes"][:32]).float().mean().item()
    assert agree > 0.6, agree
    assert math.isfinite(metrics["test/loss"])


def generate_cfg(tmp_path, *overrides):
    with initialize_config_module("t2i.conf", version_base="1.3"):
        return compose("generate", overrides=[f"paths.log_dir={tmp_path}/logs", f"output={tmp_path}/gen",
                                              "progress=false", *overrides])


def test_t2i_generate(trained, tmp_path, caplog):
    from t2i.cli.generate import run

    _, _, obj = trained
    ckpt = obj["trainer"].checkpoint_callback.best_model_path
    caption = obj["datamodule"].splits["val"].captions[0][0]
    long = caption * 6
    result = run(generate_cfg(tmp_path, f"ckpt={ckpt}", f"prompts=['{caption}','{long}','火星上的x']", "num_samples=3",
                              "top_k=16", "batch_size=4", "cfg_scale=2.0", "allow_unk=true"))
    out = tmp_path / "gen"
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert result["count"] == 9 and len(rows) == 9
    assert rows[0]["prompt"] == caption and rows[0]["settings"]["cfg_scale"] == 2.0
    assert all((out / r["file"]).exists() for r in rows)
    assert [p.name for p in sorted(out.glob("grid_*.png"))] == ["grid_p000.png", "grid_p001.png", "grid_p002.png"]
    assert Image.open(out / rows[0]["file"]).size == (16, 16)
    grid = Image.open(out / "grid_p000.png").convert("RGB")  # 16 px samples upscaled x8, 3 px grey frames
    assert grid.size == (3 * (128 + 3) + 3, 128 + 3 + 3) and grid.getpixel((1, 1)) == (170, 170, 170)
    assert "unknown to the text tokenizer" in caplog.text and "the rest is cut" in caplog.text
    # the same command twice gives the same images
    run(generate_cfg(tmp_path, f"ckpt={ckpt}", f"prompts=['{caption}','{long}','火星上的x']", "num_samples=3",
                     "top_k=16", "batch_size=4", "cfg_scale=2.0", "allow_unk=true", f"output={tmp_path}/again"))
    assert (out / "p002_s01.png").read_bytes() == (tmp_path / "again" / "p002_s01.png").read_bytes()


def test_t2i_generate_errors(trained, tmp_path):
    _, _, obj = trained
    ckpt = obj["trainer"].checkpoint_callback.best_model_path
    script = "from t2i.cli.generate import main; main()"
    for args, message in [
        ([f"ckpt={tmp_path}/nope.ckpt", "prompts=[a]"], "no such file"),
        ([f"ckpt={ckpt}"], "no prompts"),
        ([f"ckpt={ckpt}", "prompts=[a]", f"image_tokenizer={tmp_path}/none.ckpt"], "no such file"),
    ]:
        res = subprocess.run([sys.executable, "-c", script, f"hydra.run.dir={tmp_path}/h", *args],
                             capture_output=True, text=True)
        assert res.returncode == 1 and message in res.stderr, res.stderr[-1500:]


def test_nan_guard_stops_with_clear_error(tmp_path, codes):
    cfg = compose_transformer(tmp_path, codes, "debug=fdr", "+trainer.limit_train_batches=3",
                              "model.max_bad_steps=2", "trainer.fast_dev_run=3")
    import t2i.models.transformer as tr

    original = tr.Transformer.loss

    def nan_loss(self, text, image, entities=None):
        t, i = original(self, text, image, entities)
        return t * float("nan"), i

    tr.Transformer.loss = nan_loss
    try:
        with pytest.raises(T2IError, match="NaN/inf for 2 steps"):
            train(cfg)
    finally:
        tr.Transformer.loss = original


def test_sizes_need_codes_or_config():
    with pytest.raises(ConfigError, match="nothing to read them from"):
        TransformerModule(model={"text_len": 4, "n_layer": 1})
    m = TransformerModule(model=dict(text_vocab=10, text_pad_id=0, image_vocab=8, image_grid=[2, 2], text_len=4,
                                     n_layer=1, n_head=2, d_model=16))
    assert m.model.seq_len == 8


def test_images_encoded_on_the_fly(tmp_path):
    """data=shapes (images) + a frozen image tokenizer: sizes come from the tokenizers, codes are made per batch."""
    ckpt = tmp_path / "tok.ckpt"
    save_checkpoint(ckpt, downsample=4, levels=4)
    with initialize_config_module("t2i.conf", version_base="1.3"):
        cfg = compose("train", overrides=[
            "model=transformer", "logger=csv", "debug=fdr", f"paths.output_dir={tmp_path}/run",
            f"paths.data_dir={tmp_path}/data", "data.image_size=16", "data.shapes.n_train=32", "data.shapes.n_val=8",
            "data.shapes.n_test=8", "data.shapes.n_compositional=4", "data.num_workers=0", "data.batch_size=8",
            f"model.image_tokenizer={ckpt}", "model.model.n_layer=1", "model.model.d_model=32", "model.model.n_head=2",
            "callbacks.rich_summary=null", "trainer.enable_progress_bar=false"])
    from hydra.utils import instantiate

    instantiate(cfg.data, _convert_="all").prepare_data()  # Shapes and its text tokenizer on disk first
    metrics, obj = train(cfg)
    assert obj["model"].hparams.model["image_grid"] == [4, 4] and obj["model"].hparams.model["image_vocab"] == 64
    assert {"train/image_loss", "val/image_loss"} <= set(metrics)


def test_t2i_generate_reranks_with_clip(trained, tmp_path):
    from t2i.cli.generate import run
    from tests.test_clip import compose_clip

    _, clip_obj = train(compose_clip(tmp_path / "clip", "debug=fdr"))
    clip_ckpt = tmp_path / "clip.ckpt"
    clip_obj["trainer"].save_checkpoint(clip_ckpt)
    _, _, obj = trained
    ckpt = obj["trainer"].checkpoint_callback.best_model_path
    caption = obj["datamodule"].splits["val"].captions[0][0]
    run(generate_cfg(tmp_path, f"ckpt={ckpt}", f"prompts=['{caption}']", "num_samples=5", f"rerank.ckpt={clip_ckpt}",
                     "rerank.top=3"))
    rows = [json.loads(line) for line in (tmp_path / "gen" / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 3 and all(r["reranked"] for r in rows)
    scores = [r["score"] for r in rows]
    assert scores == sorted(scores, reverse=True) and len({r["drawn"] for r in rows}) == 3
    grid = Image.open(tmp_path / "gen" / "grid_p000.png").convert("RGB")  # the pick (s00) in a red frame
    assert grid.getpixel((1, 64)) == (230, 30, 30) and grid.getpixel((3 * 131 + 1, 64)) == (170, 170, 170)
