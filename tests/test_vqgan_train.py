"""VQGAN loss (adaptive weight, GAN terms, LPIPS loading) and VQGANModule training end to end."""

from pathlib import Path

import pytest
import torch
import torchvision
from hydra import compose, initialize_config_module

from t2i.cli.train import train
from t2i.errors import T2IError
from t2i.losses.perceptual import LPIPS, VGG16_FILE
from t2i.losses.vqgan import VQGANLoss, adaptive_weight, generator_adv, hinge_d, vanilla_d
from t2i.pretrained.image_tokenizers import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def test_adaptive_weight_against_hand_computation():
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    nll = (3 * w).sum()  # d/dw = 3 everywhere -> norm 3 * 2 = 6
    g = (w**2).sum()  # d/dw = 2w -> norm 2 * sqrt(30)
    expected = 6.0 / (2 * 30**0.5 + 1e-4)
    assert adaptive_weight(nll, g, w).item() == pytest.approx(expected, rel=1e-6)
    huge = adaptive_weight(nll, 0 * g, w)  # zero generator gradient: clamped at 1e4
    assert huge.item() == pytest.approx(1e4)


def test_gan_terms():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    # hinge: mean(relu(1 - real)) = 0.25, mean(relu(1 + fake)) = 0.5 -> 0.5 * 0.75
    assert hinge_d(real, fake).item() == pytest.approx(0.375)
    sp = torch.nn.functional.softplus
    assert vanilla_d(real, fake).item() == pytest.approx(0.5 * (sp(-real).mean() + sp(fake).mean()).item())
    assert generator_adv(fake, "hinge").item() == pytest.approx(1.0)
    assert generator_adv(fake, "non_saturating").item() == pytest.approx(sp(-fake).mean().item())


def test_disc_start_and_regularisers():
    loss = VQGANLoss(disc_start=5, perceptual_weight=0, disc_ndf=8, disc_layers=2, r1_weight=1.0, lecam_weight=0.1)
    x, y = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    last = torch.nn.Parameter(torch.ones(3, 3))
    recon = y * last.sum() / 9  # recon depends on the "last layer"
    total, logs = loss.generator_loss(x, recon, torch.tensor(0.1), last, step=4)
    assert "g_loss" not in logs  # before disc_start the discriminator is not even run
    assert total.item() == pytest.approx(((x - recon).abs().mean() + 0.1).item(), rel=1e-6)
    d, dlogs = loss.discriminator_loss(x, recon, step=4)
    assert d.item() == 0 and dlogs["disc_loss"] == 0
    total, logs = loss.generator_loss(x, recon, torch.tensor(0.1), last, step=5)
    assert {"g_loss", "d_weight"} <= set(logs)
    d, dlogs = loss.discriminator_loss(x, recon, step=5)
    assert dlogs["r1"] > 0 and "lecam" in dlogs and loss.ema_real != 0
    d.backward()
    assert all(p.grad is not None for p in loss.discriminator.parameters() if p.requires_grad)


def test_lpips_loads_local_vgg_and_missing_file_is_clear(tmp_path, monkeypatch):
    vgg = torchvision.models.vgg16(weights=None)
    path = tmp_path / VGG16_FILE
    torch.save({k: v for k, v in vgg.state_dict().items() if k.startswith("features.")}, path)
    lp = LPIPS(str(path))
    assert torch.equal(lp.net.net.slice1[0].weight, vgg.features[0].weight)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(lp(x, x), torch.zeros(2)) and (lp(x, -x) > 0).all()
    # the torch cache is the default place
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    with pytest.raises(T2IError, match=f"{VGG16_FILE}.*download.pytorch.org.*perceptual_weight=0"):
        LPIPS()
    (tmp_path / "th" / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "th" / "hub" / "checkpoints" / VGG16_FILE).write_bytes(path.read_bytes())
    assert torch.allclose(LPIPS()(x, -x), lp(x, -x))


def compose_vqgan(tmp_path, *overrides):
    with initialize_config_module("t2i.conf", version_base="1.3"):
        return compose("train", overrides=[
            "experiment=shapes_vqgan", "logger=csv", f"paths.output_dir={tmp_path}/run",
            f"paths.data_dir={tmp_path}/data", "data.shapes.n_train=64", "data.shapes.n_val=16",
            "data.shapes.n_test=16", "data.shapes.n_compositional=4", "data.num_workers=0", "data.batch_size=8",
            "callbacks.rich_summary=null", "trainer.enable_progress_bar=false", *overrides])


def test_fast_dev_run(tmp_path):
    cfg = compose_vqgan(tmp_path, "debug=fdr", "model.loss.disc_start=0")
    metrics, _ = train(cfg)
    assert {"train/disc_loss", "train/g_loss", "val/psnr", "val/dead_codes", "test/psnr"} <= set(metrics)


def test_shapes_vqgan_trains_and_load_tokenizer_rebuilds_it(tmp_path):
    cfg = compose_vqgan(tmp_path, "trainer.max_epochs=2", "model.loss.disc_start=6", "model.warmup_steps=2")
    metrics, obj = train(cfg)
    module = obj["model"]
    assert module.step.item() == 16  # 8 batches x 2 epochs: the batch counter drives disc_start
    assert metrics["train/disc_loss"] > 0 and 0 <= metrics["val/dead_codes"] <= 1
    assert metrics["val/psnr"] > 8  # it learned something in 16 steps (random init is ~5-6 dB)
    ckpt = obj["trainer"].checkpoint_callback.best_model_path
    tok = load_tokenizer(ckpt)
    assert tok.downsample == 4 and tok.codebook_size == 128
    x = next(iter(obj["datamodule"].test_dataloader()))
    x = obj["datamodule"].on_after_batch_transfer(x, 0)["image"]
    best = type(module).load_from_checkpoint(ckpt).model.eval()
    codes = tok.encode(x)
    assert codes.shape == (x.shape[0], 8, 8) and torch.equal(codes, best.encode(x))
    assert torch.allclose(tok.decode(codes), best.decode(codes))
    assert list((tmp_path / "run" / "images").glob("val_epoch*_reconstructions.png"))

    # t2i-tokenize with this checkpoint: the stored codes decode to the tokenizer's reconstructions
    from t2i.cli.tokenize import run
    from t2i.data.codes import load_codes

    with initialize_config_module("t2i.conf", version_base="1.3"):
        tcfg = compose("tokenize", overrides=[
            f"tokenizer_ckpt={ckpt}", f"output={tmp_path}/codes", f"paths.data_dir={tmp_path}/data", "split=test",
            "data.image_size=32", "data.shapes.n_train=64", "data.shapes.n_val=16", "data.shapes.n_test=16",
            "data.shapes.n_compositional=4", "progress=false", "num_workers=0"])
    run(tcfg)
    keys, stored, _ = load_codes(tmp_path / "codes", "test")
    batch = obj["datamodule"].on_after_batch_transfer(next(iter(obj["datamodule"].test_dataloader())), 0)
    by_key = dict(zip(keys, stored))
    mine = torch.stack([by_key[k] for k in batch["key"]])
    assert torch.equal(mine, tok.encode(batch["image"]))
    assert torch.allclose(tok.decode(mine), tok(batch["image"])[0].clamp(-1, 1), atol=1e-5)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(T2IError, match="no such file"):
        load_tokenizer(tmp_path / "nope.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(T2IError, match="not an image-tokenizer checkpoint"):
        load_tokenizer(tmp_path / "other.ckpt")
