"""dVAE: the DALL·E architecture (dall_e parameter names), its ELBO pieces, schedules, and training end to end."""

import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_module

from t2i.cli.train import train
from t2i.data.datamodule import ImageTextDataModule
from t2i.keys import TOKENIZER_KEY
from t2i.lit.dvae import DVAEModule
from t2i.losses.dvae import (
    Anneal,
    DVAELoss,
    anneal,
    kl_to_uniform,
    logit_laplace_nll,
    map_pixels,
    unmap_pixels,
)
from t2i.models.dvae import DVAE
from t2i.models.quantizers import CodebookUsage
from t2i.pretrained.image_tokenizers import load_tokenizer

TINY = dict(n_hid=16, n_blk_per_group=1, vocab_size=64, group_count=3, n_init=16)


def images(b=2, size=16, seed=0):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# -- loss pieces ---------------------------------------------------------------------------------
def test_kl_to_uniform_hand_values():
    k = 64
    assert kl_to_uniform(torch.zeros(2, k, 3, 3)).item() == pytest.approx(0.0, abs=1e-6)
    one_hot = torch.full((2, k, 3, 3), -1e4)
    one_hot[:, 5] = 0
    assert kl_to_uniform(one_hot).item() == pytest.approx(math.log(k), rel=1e-5)
    # two codes at 1/2 each: sum_k q log(q K) = log(K / 2)
    half = torch.full((1, k, 1, 1), -1e4)
    half[:, :2] = 0
    assert kl_to_uniform(half).item() == pytest.approx(math.log(k / 2), rel=1e-5)


def test_pixel_map_and_logit_laplace_nll_by_hand():
    assert map_pixels(torch.tensor([0.0, 1.0])).tolist() == pytest.approx([0.1, 0.9])
    assert unmap_pixels(torch.tensor([0.1, 0.9, 0.0, 1.0])).tolist() == pytest.approx([0.0, 1.0, 0.0, 1.0])
    x, mu, log_b = torch.tensor([0.3, 0.85]), torch.tensor([0.5, -1.0]), torch.tensor([-1.0, 0.7])
    got = logit_laplace_nll(x, mu, log_b)
    for i in range(2):
        xi, mi, bi = x[i].item(), mu[i].item(), math.exp(log_b[i].item())
        y = math.log(xi / (1 - xi))
        # Laplace density of y = logit(x), times |dy/dx| = 1 / (x (1 - x))
        p = math.exp(-abs(y - mi) / bi) / (2 * bi) / (xi * (1 - xi))
        assert got[i].item() == pytest.approx(-math.log(p), rel=1e-5)


def test_dvae_loss_weights_kl_as_the_papers_beta():
    loss = DVAELoss(kl_weight=2.0, kl_warmup_steps=10, kl_schedule="linear")
    x = images(2, 16)
    stats = torch.randn(2, 6, 16, 16)
    logits = torch.randn(2, 64, 4, 4)
    total, logs = loss(x, stats, logits, step=5)
    assert logs["kl_weight"].item() == pytest.approx(1.0)
    expected = logs["rec_loss"] + 1.0 * (16 / (3 * 16 * 16)) * logs["kl"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss(x, stats, logits, step=0)[0].item() == pytest.approx(logs["rec_loss"].item(), rel=1e-6)
    # mse on [0, 1] pixels of the decoded mean
    mse = DVAELoss(rec_loss="mse")
    target01 = (x + 1) / 2
    perfect = torch.logit(map_pixels(target01.clamp(1e-3, 1 - 1e-3)))
    assert mse.reconstruction(x, torch.cat([perfect, stats[:, 3:]], 1)).item() < 1e-5
    with pytest.raises(ValueError, match="rec_loss"):
        DVAELoss(rec_loss="l1")
    # dequantized targets: a flat image no longer has an unbounded likelihood as the scale shrinks
    flat = torch.ones(1, 3, 4, 4)
    exact = torch.cat([torch.full((1, 3, 4, 4), math.log(9.0)), torch.full((1, 3, 4, 4), -10.0)], 1)
    assert DVAELoss().reconstruction(flat, exact) < -10
    assert DVAELoss(dequantize=True).reconstruction(flat, exact) > 100


def test_schedules_start_middle_end():
    assert anneal(0, 1.0, 1 / 16, 100, "cosine") == pytest.approx(1.0)
    assert anneal(50, 1.0, 1 / 16, 100, "cosine") == pytest.approx((1 + 1 / 16) / 2)
    assert anneal(100, 1.0, 1 / 16, 100, "cosine") == pytest.approx(1 / 16)
    assert anneal(500, 1.0, 1 / 16, 100, "cosine") == pytest.approx(1 / 16)  # held after the end
    assert anneal(50, 1.0, 1 / 16, 100, "exp") == pytest.approx(0.25)  # geometric midpoint
    assert anneal(25, 0.0, 6.6, 100, "linear") == pytest.approx(1.65)
    assert anneal(0, 0.0, 6.6, 100, "constant") == 6.6
    loss = DVAELoss(kl_weight=6.6, kl_warmup_steps=5000, temperature_steps=150_000)
    assert (loss.kl_weight(0), loss.kl_weight(2500), loss.kl_weight(5000)) == pytest.approx((0.0, 3.3, 6.6))
    assert (loss.temperature(0), loss.temperature(150_000)) == pytest.approx((1.0, 1 / 16))
    with pytest.raises(ValueError, match="positive"):
        Anneal(0.0, 1.0, 10, "exp")
    with pytest.raises(ValueError, match="unknown schedule"):
        anneal(0, 1, 0, 10, "step")


# -- model ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("group_count,factor", [(2, 2), (3, 4), (4, 8)])
def test_encode_decode_shapes_and_range(group_count, factor):
    model = DVAE(**{**TINY, "group_count": group_count}).eval()
    assert model.downsample == factor and model.codebook_size == 64
    x = images(2, 16)
    codes = model.encode(x)
    assert codes.shape == (2, 16 // factor, 16 // factor) and codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < 64
    out = model.decode(codes)
    assert out.shape == (2, 3, 16, 16) and out.min() >= -1 and out.max() <= 1
    # eval forward = hard argmax codes: the same reconstruction as decode(encode(x))
    stats, logits, z = model(x)
    assert stats.shape == (2, 6, 16, 16) and logits.shape == (2, 64, 16 // factor, 16 // factor)
    assert torch.equal(z.argmax(1), codes) and torch.equal(z.sum(1), torch.ones_like(codes, dtype=z.dtype))
    torch.testing.assert_close(model.stats_to_images(stats), out)


def test_size_not_divisible_names_the_factor():
    model = DVAE(**TINY)
    with pytest.raises(ValueError, match="not divisible by the dVAE downsampling factor 4"):
        model.encode(images(1, 18))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 64\)"):
        model.decode(torch.full((1, 2, 2), 64))


def test_gumbel_relaxation_soft_and_straight_through():
    model = DVAE(**TINY).train()
    torch.manual_seed(0)
    _, _, soft = model(images(), temperature=1.0)
    assert torch.allclose(soft.sum(1), torch.ones(2, 4, 4)) and soft.max() < 1
    _, _, hard = model(images(), temperature=1.0, hard=True)
    assert set(hard.unique().tolist()) == {0.0, 1.0}


def test_parameter_names_match_dall_e():
    model = DVAE()  # the released DALL·E configuration
    enc, dec = model.encoder.state_dict(), model.decoder.state_dict()
    for name, shape in [("blocks.input.w", (256, 3, 7, 7)), ("blocks.input.b", (256,)),
                        ("blocks.group_1.block_1.res_path.conv_1.w", (64, 256, 3, 3)),
                        ("blocks.group_1.block_1.res_path.conv_4.w", (256, 64, 1, 1)),
                        ("blocks.group_2.block_1.id_path.w", (512, 256, 1, 1)),
                        ("blocks.group_4.block_2.res_path.conv_3.b", (512,)),
                        ("blocks.output.conv.w", (8192, 2048, 1, 1))]:
        assert tuple(enc[name].shape) == shape, name
    for name, shape in [("blocks.input.w", (128, 8192, 1, 1)),
                        ("blocks.group_1.block_1.id_path.w", (2048, 128, 1, 1)),
                        ("blocks.group_1.block_1.res_path.conv_1.w", (512, 128, 1, 1)),
                        ("blocks.group_1.block_1.res_path.conv_4.w", (2048, 512, 3, 3)),
                        ("blocks.group_4.block_1.id_path.w", (256, 512, 1, 1)),
                        ("blocks.output.conv.w", (6, 256, 1, 1))]:
        assert tuple(dec[name].shape) == shape, name
    assert "blocks.group_1.block_2.id_path.w" not in enc  # identity when widths agree
    # input + 8 blocks x 4 convs + id paths (encoder: groups 2-4; decoder: 1-4, n_init != 2048) + output
    assert len(enc) == 2 + 8 * 4 * 2 + 3 * 2 + 2 and len(dec) == 2 + 8 * 4 * 2 + 4 * 2 + 2


# -- Lightning module ----------------------------------------------------------------------------------
def test_training_step_gives_finite_loss_and_gradients():
    module = DVAEModule(model=TINY, loss={"kl_warmup_steps": 0})
    loss = module.training_step({"image": images(4, 16)}, 0)
    assert torch.isfinite(loss)
    loss.backward()
    for part in (module.model.encoder, module.model.decoder):
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    # an empty batch (every image undecodable) is a NaN loss: the step is skipped, on every rank under DDP
    assert torch.isnan(module.training_step({"image": torch.empty(0, 3, 16, 16)}, 0))  # (after the transfer)
    logged = module.log_images({"image": images(3, 16)})
    assert logged["inputs"].shape == logged["reconstructions"].shape == (3, 3, 16, 16)
    assert logged["reconstructions"].abs().max() <= 1 and module.model.training


def test_codebook_usage_counts_perplexity_and_dead_codes():
    usage = CodebookUsage(8)
    usage.update(torch.tensor([[0, 1], [0, 1]]))
    usage.update(torch.tensor([2, 3, 2, 3]))
    stats = usage.compute()
    perplexity, dead = stats["perplexity"], stats["dead_codes"]
    assert perplexity.item() == pytest.approx(4.0) and dead.item() == pytest.approx(0.5)


def write_small_shapes(root: Path) -> Path:
    from t2i.data.shapes import write_shapes
    write_shapes(root, n_train=16, n_val=8, n_test=8, n_compositional=4, image_size=16, progress=False)
    return root


def test_fast_dev_run_fit(tmp_path):
    root = write_small_shapes(tmp_path / "shapes")
    dm = ImageTextDataModule(train=str(root / "shapes_train.tsv"), val=str(root / "shapes_val.tsv"),
                             image_size=16, batch_size=4, num_workers=0, pin_memory=False,
                             persistent_workers=False)
    module = DVAEModule(model=TINY, lr=1e-3)
    before = module.model.encoder.blocks.input.w.detach().clone()
    trainer = pl.Trainer(fast_dev_run=True, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    m = trainer.callback_metrics
    for key in ("train/loss", "train/rec_loss", "train/kl", "train/temperature", "train/kl_weight",
                "val/rec_loss", "val/psnr", "val/ssim", "val/codebook_perplexity", "val/dead_codes"):
        assert key in m and torch.isfinite(m[key]), key
    assert 1 <= m["val/codebook_perplexity"] <= 64 and 0 <= m["val/dead_codes"] < 1
    assert not torch.equal(before, module.model.encoder.blocks.input.w)


ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.shapes.n_train=32", "data.shapes.n_val=16", "data.shapes.n_test=16", "data.shapes.n_compositional=4",
         "data.batch_size=8", "data.num_workers=0", "model.model.n_hid=16", "model.model.vocab_size=32",
         "trainer.enable_progress_bar=false", "callbacks.rich_summary=null"]


def compose_dvae(tmp_path, overrides):
    with initialize_config_module("t2i.conf", version_base="1.3"):
        return compose("train", overrides=["experiment=shapes_dvae", f"paths.output_dir={tmp_path}/run",
                                           f"paths.data_dir={tmp_path}/data", *SMALL, *overrides])


def test_experiment_config_composes_to_the_tiny_model(tmp_path):
    cfg = compose_dvae(tmp_path, [])
    assert cfg.model._target_ == "t2i.lit.dvae.DVAEModule" and cfg.data.image_size == 32
    assert cfg.model.model.group_count == 3 and cfg.model.loss.eps == 0.1
    assert cfg.callbacks.model_checkpoint.monitor == cfg.optimized_metric == "val/rec_loss"


def test_train_experiment_then_load_tokenizer(tmp_path):
    # debug=fdr drops the logger, and LearningRateMonitor refuses to run without one
    cfg = compose_dvae(tmp_path, ["debug=fdr", "callbacks.lr_monitor=null"])
    metrics, _ = train(cfg)
    assert math.isfinite(metrics["val/rec_loss"]) and "test/psnr" in metrics

    cfg = compose_dvae(tmp_path, ["logger=csv", "trainer.max_epochs=1", "+trainer.limit_train_batches=2",
                                  "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1",
                                  "trainer.num_sanity_val_steps=0"])
    metrics, obj = train(cfg)
    ckpt = obj["trainer"].checkpoint_callback.best_model_path
    assert ckpt and Path(ckpt).exists()
    tokenizer = load_tokenizer(ckpt)  # weights_only load, rebuilt from the checkpoint entry alone
    assert isinstance(tokenizer, DVAE) and tokenizer.downsample == 4 and tokenizer.codebook_size == 32
    entry = torch.load(ckpt, map_location="cpu", weights_only=True)[TOKENIZER_KEY]
    assert entry["target"] == "t2i.models.dvae.DVAE" and entry["config"]["n_hid"] == 16
    x = images(2, 32, seed=1)
    module = DVAEModule.load_from_checkpoint(ckpt, map_location="cpu").eval()
    assert torch.equal(tokenizer.encode(x), module.model.encode(x))
    assert torch.equal(tokenizer.encode(x), obj["model"].model.eval().encode(x))  # tested on that checkpoint
    torch.testing.assert_close(tokenizer.decode(tokenizer.encode(x)), module.model.decode(module.model.encode(x)))
