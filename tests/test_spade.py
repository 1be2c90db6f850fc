"""SPADE / GauGAN (issue 21): the SPADE layer against a hand computation, generator sizes per config, the
losses on tiny tensors, empty batches, the module through t2i-train, checkpoint rebuild, DDP == one process."""

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from t2i.cli.train import train
from t2i.errors import T2IError
from t2i.lit.spade import SPADEModule
from t2i.losses.spade import feature_matching, hinge_d, hinge_g, kl_divergence
from t2i.models.spade import SPADE, SPADEGenerator, block_layout, instance_edges, label_input

TINY = dict(ngf=4, latent_size=4, z_dim=8, nef=4, hidden=8, norm="instance")
TINY_LOSS = dict(disc_ndf=8, disc_layers=2, num_d=1, perceptual_weight=0.0)  # 16 px: one scale


def compose_cfg(*overrides, experiment="shapes_spade"):
    with initialize_config_module("t2i.conf", version_base="1.3"):
        return compose("train", overrides=[f"experiment={experiment}", *overrides])


# -- the SPADE layer ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_spade_with_constant_map_is_the_norms_affine(norm):
    torch.manual_seed(0)
    layer = SPADE(channels=4, label_nc=3, hidden=5, kernel_size=3, norm=norm).train()
    x = torch.randn(2, 4, 8, 8) * 3 + 1
    seg = torch.zeros(2, 3, 4, 4)
    seg[:, 1] = 1  # every pixel class 1 (the map is resized to x's 8 x 8, nearest)
    out = layer(x, seg)
    # by hand: a constant map gives constant gamma / beta away from the zero padding (2 px: two 3x3 convs)
    m = torch.tensor([0.0, 1.0, 0.0])
    h = torch.relu(layer.shared[0].bias + layer.shared[0].weight.sum((2, 3)) @ m)
    gamma = layer.gamma.bias + layer.gamma.weight.sum((2, 3)) @ h
    beta = layer.beta.bias + layer.beta.weight.sum((2, 3)) @ h
    dims = (2, 3) if norm == "instance" else (0, 2, 3)  # per sample and channel | per channel over the batch
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-5) * (1 + gamma.view(1, 4, 1, 1)) + beta.view(1, 4, 1, 1)
    assert torch.allclose(out[..., 2:-2, 2:-2], expected[..., 2:-2, 2:-2], atol=1e-5)
    assert not torch.allclose(out, expected, atol=1e-3)  # the border sees the padding: the check is not vacuous


def test_label_input_and_instance_edges():
    inst = torch.tensor([[[1, 1, 2], [1, 1, 2], [3, 3, 3]]])
    assert instance_edges(inst)[0, 0].tolist() == [[0, 1, 1], [1, 1, 1], [1, 1, 1]]
    x = label_input(torch.tensor([[[0, 2], [1, 2]]]), 3, inst[:, :2, :2], use_instance=True)
    assert x.shape == (1, 4, 2, 2) and x[0, 2].tolist() == [[0, 1], [0, 1]] and x[0, 3].sum() == 0
    with pytest.raises(ValueError, match="0..2"):
        label_input(torch.tensor([[[3]]]), 3)


# -- generator size per config -------------------------------------------------------------------------------
@pytest.mark.parametrize("experiment,overrides,size,label_nc,n_up", [
    ("shapes_spade", [], (32, 32), 25, 3),
    ("shapes_spade", ["data.image_size=64"], (64, 64), 25, 4),
    ("ade20k_spade", [], (256, 256), 151, 5),
    ("coco_stuff_spade", [], (256, 256), 183, 5),
    ("cityscapes_spade", [], (256, 512), 36, 5),
])
def test_generator_output_size_follows_config(experiment, overrides, size, label_nc, n_up):
    cfg = compose_cfg(*overrides, "model.model.ngf=2", "model.model.hidden=4", "model.model.nef=2",
                      "model.model.use_vae=false", experiment=experiment)
    m = OmegaConf.to_container(cfg.model.model, resolve=True)
    num_classes, use_instance = m.pop("num_classes"), m.pop("use_instance")
    m.pop("nef")
    assert num_classes + use_instance == label_nc
    g = SPADEGenerator(label_nc, **m)
    assert g.n_up == n_up and g.size == size
    if n_up == 5:  # the paper's "normal" layout: head, up, two 16 ngf middle blocks, four upsampling blocks
        assert len(g.blocks) == 7 and (g.sh, g.sw) == (8, size[1] // 32) and g.top == 16 * 2
    with torch.no_grad():
        out = g(torch.zeros(1, label_nc, *size))
    assert out.shape == (1, 3, *size)
    assert block_layout(6)[2] == (True, 16, 16) and block_layout(7)[-1] == (True, 1, 0.5)


def test_generator_rejects_sizes_off_the_grid():
    with pytest.raises(T2IError, match="latent_size"):
        SPADEGenerator(3, image_size=48, latent_size=5)


# -- losses --------------------------------------------------------------------------------------------------
def test_hinge_losses_by_hand():
    real = [torch.tensor([2.0, 0.5]), torch.tensor([-1.0])]
    fake = [torch.tensor([-2.0, 0.0]), torch.tensor([0.5])]
    # real: scale 0 mean(relu(1 - r)) = (0 + 0.5) / 2 = 0.25, scale 1: 2 -> 1.125
    # fake: scale 0 mean(relu(1 + f)) = (0 + 1) / 2 = 0.5, scale 1: 1.5 -> 1.0
    assert hinge_d(real, fake).item() == pytest.approx(2.125)
    assert hinge_g(fake).item() == pytest.approx((1.0 - 0.5) / 2)


def test_feature_matching_by_hand():
    fake = [[torch.tensor([1.0, 2.0], requires_grad=True), torch.tensor([3.0]), torch.tensor([100.0])],
            [torch.tensor([0.0]), torch.tensor([-50.0])]]
    real = [[torch.tensor([0.0, 0.0], requires_grad=True), torch.tensor([1.0]), torch.tensor([0.0])],
            [torch.tensor([4.0]), torch.tensor([0.0])]]
    fm = feature_matching(fake, real, weight=10.0)
    # scale 0: |1-0|,|2-0| -> 1.5 and |3-1| = 2; scale 1: |0-4| = 4; logits (last) not matched; 10 / 2 scales
    assert fm.item() == pytest.approx((1.5 + 2 + 4) * 10 / 2)
    fm.backward()
    assert real[0][0].grad is None and fake[0][0].grad.tolist() == [2.5, 2.5]  # sign(f - r) / 2 * 10 / 2


def test_kl_is_the_closed_form():
    torch.manual_seed(0)
    mu, logvar = torch.randn(3, 5), torch.randn(3, 5)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    ref = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(1).mean()
    assert kl_divergence(mu, logvar).item() == pytest.approx(ref.item(), rel=1e-6)
    assert kl_divergence(torch.zeros(2, 4), torch.zeros(2, 4)).item() == 0


# -- the module ----------------------------------------------------------------------------------------------
def tiny_module(**kw) -> SPADEModule:
    model = dict(num_classes=5, use_instance=False, image_size=16, **TINY)
    model.update(kw.pop("model", {}))
    return SPADEModule(model=model, loss=dict(TINY_LOSS), **kw)


def test_empty_batch_is_a_skipped_step():
    torch.manual_seed(0)
    module = tiny_module()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    empty = {"label": torch.zeros(0, 16, 16, dtype=torch.long), "image": torch.zeros(0, 3, 16, 16), "key": []}
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([empty], batch_size=None))
    after = module.state_dict()
    params = {n for n, _ in module.named_parameters()}
    assert all(torch.equal(before[k], after[k]) for k in params)  # no weight moved: both steps skipped
    assert module.g_guard.skipped.item() == 1 and module.d_guard.skipped.item() == 1


def test_ema_generator_follows_and_generates():
    torch.manual_seed(0)
    module = tiny_module(ema_decay=0.5)
    start = [p.clone() for p in module.ema.parameters()]
    batches = [{"label": torch.randint(0, 5, (4, 16, 16)), "image": torch.rand(4, 3, 16, 16) * 2 - 1,
                "key": ["a"] * 4} for _ in range(2)]
    trainer = pl.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    ema, gen = list(module.ema.parameters()), list(module.generator.parameters())
    # two steps of ema += 0.5 * (model - ema): strictly between the start and the trained weights somewhere
    assert any(not torch.equal(e, s) for e, s in zip(ema, start))
    assert any(not torch.equal(e, g) for e, g in zip(ema, gen))
    for e, g in zip(module.ema.buffers(), module.generator.buffers()):  # norm statistics / spectral vectors copied
        assert torch.equal(e, g)
    label = batches[0]["label"]
    assert torch.equal(module.generate(label), module.ema.eval()(module.seg_input(label)).clamp(-1, 1))


def test_missing_vgg_file_is_the_clear_error(tmp_path):
    module = tiny_module()
    module.loss.perceptual_weight, module.loss.vgg_path = 1.0, str(tmp_path / "none.pth")
    with pytest.raises(T2IError, match="vgg16-397923af.pth.*perceptual_weight=0"):
        module.setup("fit")


def test_generate_styles_and_errors():
    torch.manual_seed(0)
    module = tiny_module(model={"use_vae": True})
    label = torch.randint(0, 5, (2, 16, 16))
    a = module.generate(label, style="random", generator=torch.Generator().manual_seed(1))
    b = module.generate(label, style="random", generator=torch.Generator().manual_seed(1))
    c = module.generate(label, style="random", generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.allclose(a, c) and a.abs().max() <= 1
    assert module.generate(label, style=torch.zeros(2, 3, 16, 16)).shape == (2, 3, 16, 16)
    with pytest.raises(T2IError, match="16, 16"):
        module.generate(torch.zeros(1, 8, 8, dtype=torch.long))
    plain = tiny_module()
    with pytest.raises(T2IError, match="no style encoder"):
        plain.generate(label, style=torch.zeros(2, 3, 16, 16))
    assert torch.equal(plain.generate(label), plain.generate(label, style="random"))


def layout_overrides(tmp_path, *extra):
    return [f"paths.output_dir={tmp_path}/run", f"paths.data_dir={tmp_path}/data", "logger=csv",
            "data.image_size=16", "data.shapes_layout.n_train=32", "data.shapes_layout.n_val=8",
            "data.shapes_layout.n_test=8", "data.num_workers=0", "data.batch_size=8", "callbacks.rich_summary=null",
            "trainer.enable_progress_bar=false", "model.model.ngf=4", "model.model.hidden=8", "model.model.nef=4",
            "model.model.z_dim=8", "model.loss.disc_ndf=8", "model.loss.num_d=1", *extra]


def test_fast_dev_run(tmp_path):
    metrics, _ = train(compose_cfg(*layout_overrides(tmp_path, "debug=fdr")))
    assert {"train/disc_loss", "train/g_loss", "train/feat_loss", "train/kl", "val/l1", "val/psnr",
            "test/l1"} <= set(metrics)


def test_checkpoint_rebuilds_and_generates_the_same(tmp_path):
    metrics, obj = train(compose_cfg(*layout_overrides(tmp_path, "trainer.max_epochs=1", "model.ema_decay=null",
                                                                "test=false")))
    assert metrics["train/skipped_steps"] == 0
    path = obj["trainer"].checkpoint_callback.best_model_path
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    rebuilt = SPADEModule(**ckpt["hyper_parameters"])
    rebuilt.load_state_dict(ckpt["state_dict"])  # strict: no VGG or other extra weights
    trained = SPADEModule.load_from_checkpoint(path, map_location="cpu")
    batch = obj["datamodule"].on_after_batch_transfer(next(iter(obj["datamodule"].val_dataloader())), 0)
    for style in (None, "random", batch["image"]):
        gen = [torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)]
        a = rebuilt.generate(batch["label"], style=style, generator=gen[0])
        b = trained.generate(batch["label"], style=style, generator=gen[1])
        assert torch.equal(a, b)
    fresh = SPADEModule(**ckpt["hyper_parameters"])
    assert not torch.equal(fresh.generate(batch["label"]), rebuilt.generate(batch["label"]))  # trained weights
    grid = sorted(Path(tmp_path / "run" / "images").glob("val_epoch*_synthesis.png"))
    assert grid and grid[-1].stat().st_size > 1000


@pytest.mark.slow
def test_ddp_step_equals_one_process(tmp_path):
    from tests.test_scale import CPU_DDP, QUIET, recorded, summary, t2i_train

    keys = "[train/total_loss,train/disc_loss,train/g_loss,train/feat_loss]"
    args = ["experiment=shapes_spade", "data.image_size=16", "data.shapes_layout.n_train=64",
            "data.shapes_layout.n_val=16", "data.shapes_layout.n_test=8", "model.model.use_vae=false",
            "model.model.norm=instance", "model.model.ngf=4", "model.model.hidden=8", "model.loss.disc_ndf=8",
            "model.loss.num_d=1",
            "trainer.max_steps=8", "trainer.max_epochs=-1", "trainer.val_check_interval=4",  # 2 optimizer steps a batch
            "trainer.check_val_every_n_epoch=null", "+callbacks.recorder._target_=tests.recorder.LossRecorder",
            f"+callbacks.recorder.keys={keys}", *QUIET]
    t2i_train(tmp_path, [*args, "data.batch_size=8", f"+callbacks.recorder.path={tmp_path}/one",
                         f"hydra.run.dir={tmp_path}/one"])
    t2i_train(tmp_path, [*args, *CPU_DDP, "data.batch_size=4", f"+callbacks.recorder.path={tmp_path}/two",
                         f"hydra.run.dir={tmp_path}/two"], nproc=2)
    (one,), (r0, r1) = recorded(tmp_path / "one", 1), recorded(tmp_path / "two", 2)
    assert len(one) == len(r0) == len(r1) == 4
    assert all(a["batch"] + b["batch"] == s["batch"] for a, b, s in zip(r0, r1, one))
    for key in ("train/total_loss", "train/disc_loss", "train/g_loss", "train/feat_loss"):
        ddp = [(a[key] + b[key]) / 2 for a, b in zip(r0, r1)]
        assert ddp[0] == pytest.approx(one[0][key], rel=1e-4, abs=1e-6), key
        assert ddp == pytest.approx([s[key] for s in one], rel=5e-3, abs=1e-4), key
    assert summary(tmp_path / "two")["metrics"]["val/l1"] == pytest.approx(
        summary(tmp_path / "one")["metrics"]["val/l1"], rel=2e-3)
