"""t2i-synthesize and t2i-eval eval=spade (issue 21) on a tiny stand-in SPADE module: files written and equal to
the module's images, bad maps counted, styles differ, the layout oracle scores a painter of the true colours 1.0
and a painter of shuffled colours low, FID through our extractor and cache, mIoU equal to a hand computation."""

import json

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from PIL import Image
from torch import nn

from t2i.cli import synthesize as synth
from t2i.data.layouts import NUM_LAYOUT_CLASSES, write_shapes_layout
from t2i.data.oracle import layout_accuracy
from t2i.data.shapes import BACKGROUND, COLORS, SHAPES
from t2i.data.skips import DataError
from t2i.errors import ConfigError
from t2i.metrics.segmentation import ConfusionMatrix, mean_iou
from t2i.pipeline import spade as spade_lib

TINY = '{_target_:tests.test_eval.TinyFeatures,num_features:8}'
REAL_MODULE_CLASS = spade_lib.module_class  # SPADEModule (the stand-in replaces it in most tests)


def shapes_palette() -> torch.Tensor:
    rgb = [BACKGROUND] + [c for c in COLORS.values() for _ in SHAPES]
    return torch.tensor(rgb, dtype=torch.float32) / 127.5 - 1


class Size(nn.Module):
    def __init__(self, size):
        super().__init__()
        self.size = (size, size)


class StandInSPADE(nn.Module):
    """What t2i-synthesize / eval=spade use of SPADEModule: ``num_classes``, ``use_instance``, the generator's
    ``size`` and ``generate``. It paints each class in a colour of its table (``painter=shapes``: the Shapes
    colours, so a map comes back as its layout; ``shuffled``: the table permuted); ``style="random"`` tints the
    background, a style image gives its mean colour to the background."""

    def __init__(self, model: dict, **_):
        super().__init__()
        self.num_classes, self.use_instance = int(model["num_classes"]), False
        self.generator = Size(int(model["image_size"]))
        table = shapes_palette() if self.num_classes == NUM_LAYOUT_CLASSES else \
            torch.rand(self.num_classes, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1
        if model.get("painter") == "shuffled":
            table = torch.cat([table[:1], table[1:][torch.randperm(len(table) - 1, generator=torch.Generator()
                                                                    .manual_seed(0))]])
        self.table = nn.Parameter(table)

    def sampling_generator(self):
        return self.generator

    @torch.no_grad()
    def generate(self, label, instance=None, style=None, generator=None):
        img = self.table[label.long()].permute(0, 3, 1, 2).clone()
        bg = (label == 0)[:, None].float()
        if style == "random":
            tint = torch.rand(len(label), 3, 1, 1, generator=generator, device=label.device) * 0.3
            img = img - bg * tint
        elif torch.is_tensor(style):
            img = img * (1 - bg) + bg * style.mean((2, 3), keepdim=True)
        return img.clamp(-1, 1)


def save_standin(path, painter="shapes", num_classes=NUM_LAYOUT_CLASSES, image_size=32):
    m = StandInSPADE({"num_classes": num_classes, "image_size": image_size, "painter": painter})
    hp = {"model": {"num_classes": num_classes, "image_size": image_size, "painter": painter}}
    torch.save({"hyper_parameters": hp, "state_dict": m.state_dict()}, path)
    return path


@pytest.fixture(autouse=True)
def standin(monkeypatch):
    monkeypatch.setattr(spade_lib, "module_class", lambda: StandInSPADE)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("sl")
    write_shapes_layout(root, n_train=2, n_val=2, n_test=12, image_size=32, progress=False)
    return root


def synth_cfg(tmp_path, *overrides):
    with initialize_config_module("t2i.conf", version_base="1.3"):
        return compose("synthesize", overrides=[f"paths.root_dir={tmp_path}", f"output={tmp_path}/out",
                                                "progress=false", "device=cpu", *overrides])


def test_synthesize_writes_pngs_grid_and_jsonl(tmp_path, layouts):
    ckpt = save_standin(tmp_path / "spade.ckpt")
    res = synth.run(synth_cfg(tmp_path, f"ckpt={ckpt}", f"maps={layouts}/test", "style=random", "num_styles=3",
                              "batch_size=5"))
    out = tmp_path / "out"
    rows = [json.loads(line) for line in (out / "synthesize.jsonl").read_text().splitlines()]
    assert res["n_maps"] == 12 and len(rows) == 36 and (out / "grid.png").is_file()
    assert [r["seed"] for r in rows[:3]] == [0, 1, 2] and rows[0]["style"] == "random"
    stems = sorted(p.stem for p in (layouts / "test" / "labels").glob("*.png"))
    module = StandInSPADE({"num_classes": 25, "image_size": 32})
    label = torch.from_numpy(np.asarray(Image.open(layouts / "test" / "labels" / f"{stems[4]}.png")).astype(np.int64))
    for k in range(3):  # the written PNG is the module's image for that style seed, quantised
        want = module.generate(label[None], style="random", generator=torch.Generator().manual_seed(k))[0]
        got = torch.from_numpy(np.array(Image.open(out / f"{stems[4]}_s{k:02d}.png"))).permute(2, 0, 1)
        assert (got.float() - (want + 1) * 127.5).abs().max() <= 1.0
    files = [[Image.open(out / f"{s}_s{k:02d}.png") for s in stems] for k in range(3)]
    maps = [np.asarray(Image.open(layouts / "test" / "labels" / f"{s}.png")) for s in stems]
    for k in range(3):  # the layout holds for every style, and the styles differ
        assert layout_accuracy(files[k], maps)["all"] == 1.0
    assert not np.array_equal(np.asarray(files[0][0]), np.asarray(files[1][0]))
    corner = np.stack([[np.asarray(f)[0, 0] for f in row] for row in files])  # background: the style's tint
    assert (corner == corner[:, :1]).all()  # style k is the same draw for every map


def test_synthesize_style_null_and_style_images(tmp_path, layouts):
    ckpt = save_standin(tmp_path / "spade.ckpt")
    res = synth.run(synth_cfg(tmp_path, f"ckpt={ckpt}", f"maps={layouts}/test/labels", "style=null", "limit=4"))
    assert res["n_styles"] == 1 and len(list((tmp_path / "out").glob("*_s00.png"))) == 4
    styles = tmp_path / "styles"
    styles.mkdir()
    for i, c in enumerate([(250, 0, 0), (0, 0, 250)]):
        Image.new("RGB", (40, 30), c).save(styles / f"{i}.jpg")
    res = synth.run(synth_cfg(tmp_path, f"ckpt={ckpt}", f"maps={layouts}/test", f"style={styles}", "num_styles=5",
                              "limit=2", f"output={tmp_path}/out2"))
    assert res["n_styles"] == 2  # the folder holds 2 images
    bg = res["images"][:, :, :, 0, 0]  # a corner: background in every layout
    assert bg[0, 0, 0] > 0.9 and bg[0, 1, 2] > 0.9 and bg[0, 0, 2] < -0.9


def test_synthesize_counts_bad_maps_and_stops_past_the_limit(tmp_path, layouts):
    ckpt = save_standin(tmp_path / "spade.ckpt")
    maps = tmp_path / "maps"
    maps.mkdir()
    for p in sorted((layouts / "test" / "labels").glob("*.png")):
        (maps / p.name).write_bytes(p.read_bytes())
    Image.fromarray(np.full((32, 32), 30, dtype=np.uint8)).save(maps / "zz_range.png")  # class 30 > 24
    (maps / "zz_broken.png").write_bytes(b"\x89PNG nope")
    res = synth.run(synth_cfg(tmp_path, f"ckpt={ckpt}", f"maps={maps}", "max_bad_fraction=0.2", "num_styles=1",
                              "style=random"))
    assert res["n_maps"] == 12 and res["skipped"]["by_reason"] == {"label_out_of_range": 1, "bad_label": 1}
    with pytest.raises(DataError, match="max_bad_fraction=0.1"):
        synth.run(synth_cfg(tmp_path, f"ckpt={ckpt}", f"maps={maps}", "max_bad_fraction=0.1"))


def test_synthesize_clear_errors(tmp_path, layouts):
    with pytest.raises(ConfigError, match="ckpt=.*no such file"):
        synth.run(synth_cfg(tmp_path, f"ckpt={tmp_path}/missing.ckpt", f"maps={layouts}/test"))
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(Exception, match="not a SPADE checkpoint"):
        synth.run(synth_cfg(tmp_path, f"ckpt={tmp_path}/other.ckpt", f"maps={layouts}/test"))
    with pytest.raises(ConfigError, match="a shapes_layout folder: give a split, e.g. maps=.*/test"):
        synth.run(synth_cfg(tmp_path, f"ckpt={tmp_path}/other.ckpt", f"maps={layouts}"))
    with pytest.raises(ConfigError, match="maps=.*no such folder"):
        synth.run(synth_cfg(tmp_path, f"ckpt={tmp_path}/other.ckpt", f"maps={tmp_path}/nope"))


# -- eval=spade ------------------------------------------------------------------------------------------------
def eval_cfg(tmp_path, *overrides):
    with initialize_config_module("t2i.conf", version_base="1.3"):
        return compose("eval", overrides=[f"paths.root_dir={tmp_path}", f"output={tmp_path}/eval", "progress=false",
                                          "device=cpu", "eval=spade", "metrics.inception_score=false",
                                          f"metrics.extractor={TINY}", *overrides])


def test_eval_spade_on_shapes_layouts(tmp_path):
    from t2i.cli.evaluate import run

    good = save_standin(tmp_path / "good.ckpt")
    bad = save_standin(tmp_path / "bad.ckpt", painter="shuffled")
    args = ("eval.num_maps=24", "eval.num_styles=2", "batch_size=10")
    res = run(eval_cfg(tmp_path, f"ckpt={good}", *args))
    m = res["splits"]["test"]
    assert m["layout"]["all"] == 1.0 and m["layout_per_style"] == [1.0, 1.0] and m["layout_real"]["all"] == 1.0
    assert m["diversity_l1"] > 0.01 and m["fid"] == pytest.approx(m["fid"]) and not m["real_from_cache"]
    assert res["summary"]["layout_all"] == 1.0 and (tmp_path / "eval" / "samples.png").is_file()
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["summary"]["layout_all"] == 1.0 and saved["checkpoints"]["spade_sha256"]
    res2 = run(eval_cfg(tmp_path, f"ckpt={bad}", *args))
    m2 = res2["splits"]["test"]
    assert m2["real_from_cache"] and m2["layout"]["all"] < 0.2 and m2["layout"]["color"] < 0.3
    assert m2["fid"] > m["fid"]  # the right colours are nearer the real images


class ColourSeg(nn.Module):
    """A 'segmentation network' for the stand-in's colours: the nearest table colour wins (logits = -distance)."""

    def __init__(self, num_classes: int = 6):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(num_classes, 3))

    def forward(self, x):  # x normalised with mean 0.5, std 0.5: back in [-1, 1]
        d = ((x[:, None] - self.table[None, :, :, None, None]) ** 2).sum(2)
        return {"out": -d}


def test_eval_spade_miou_on_a_label_folder_with_a_local_segmenter(tmp_path):
    from t2i.cli.evaluate import run

    n_cls = 6
    imgs, labs = tmp_path / "data" / "images", tmp_path / "data" / "labels"
    imgs.mkdir(parents=True)
    labs.mkdir(parents=True)
    rng = np.random.default_rng(0)
    module = StandInSPADE({"num_classes": n_cls, "image_size": 16})
    for i in range(5):
        lab = np.repeat(np.repeat(rng.integers(0, n_cls, (4, 4)), 4, 0), 4, 1)
        Image.fromarray(lab.astype(np.uint8)).save(labs / f"{i}.png")
        real = module.generate(torch.from_numpy(lab)[None])[0]
        Image.fromarray(((real + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()).save(imgs / f"{i}.png")
    ckpt = save_standin(tmp_path / "spade.ckpt", num_classes=n_cls, image_size=16)
    seg = ColourSeg(n_cls)
    seg.table.data = module.table.data.clone()
    torch.save(seg.state_dict(), tmp_path / "seg.pt")
    spec = f"{{_target_:tests.test_synthesize.ColourSeg,num_classes:{n_cls}}}"
    common = [f"ckpt={ckpt}", "eval.data=label_folder", "eval.num_maps=5", "eval.style=null", "batch_size=2",
              f"eval.split={{image_dir:{imgs},label_dir:{labs},num_classes:{n_cls}}}", "eval.seg.ignore_index=null",
              "eval.seg.mean=[0.5,0.5,0.5]", "eval.seg.std=[0.5,0.5,0.5]", f"eval.seg.model={spec}"]
    with pytest.raises(ConfigError, match="eval.seg.ckpt=.*no such file.*never downloaded"):
        run(eval_cfg(tmp_path, *common, f"eval.seg.ckpt={tmp_path}/none.pt"))
    res = run(eval_cfg(tmp_path, *common, f"eval.seg.ckpt={tmp_path}/seg.pt"))
    m = next(iter(res["splits"].values()))
    assert m["miou"] == 1.0 and m["miou_real"] == 1.0 and m["seg_fake"]["pixel_accuracy"] == 1.0


def test_miou_equals_a_hand_computation():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 1, 3]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 1, 3]])
    # class 0: tp 1, fp 1 (pred 0 at [1,1]), fn 1 -> 1/3; class 1: tp 3, fp 1, fn 0 -> 3/4
    # class 2: tp 1, fp 0, fn 1 -> 1/2; class 3: tp 1 -> 1
    r = mean_iou(pred, target, num_classes=5)
    assert r["per_class_iou"][:4] == pytest.approx([1 / 3, 3 / 4, 1 / 2, 1.0]) and r["per_class_iou"][4] is None
    assert r["miou"] == pytest.approx((1 / 3 + 3 / 4 + 1 / 2 + 1) / 4) and r["pixel_accuracy"] == pytest.approx(6 / 8)
    # ignore_index 0: its pixels leave the matrix (so the 1 predicted on a 0 is no false positive any more); the
    # pixel predicted 0 on a 2 stays a miss for class 2; class 0 is not averaged
    r0 = mean_iou(pred, target, num_classes=5, ignore_index=0)
    assert r0["per_class_iou"][1:4] == pytest.approx([1.0, 1 / 2, 1.0]) and r0["classes"] == 3
    assert r0["miou"] == pytest.approx((1 + 1 / 2 + 1) / 3) and r0["pixel_accuracy"] == pytest.approx(5 / 6)
    cm = ConfusionMatrix(5)  # batches accumulate
    cm.update(pred[:1], target[:1])
    cm.update(pred[1:], target[1:])
    assert cm.compute() == r


def test_eval_spade_needs_a_segmenter_on_real_data(tmp_path):
    from t2i.cli.evaluate import run

    ckpt = save_standin(tmp_path / "spade.ckpt")
    with pytest.raises(ConfigError, match="needs a segmentation network: eval.seg.ckpt"):
        run(eval_cfg(tmp_path, f"ckpt={ckpt}", "eval.data=ade20k", f"eval.root={tmp_path}"))
    with pytest.raises(ConfigError, match="eval=spade needs ckpt="):
        run(eval_cfg(tmp_path))


def test_synthesize_and_eval_load_a_real_spade_checkpoint(tmp_path, layouts, monkeypatch):
    """``SPADEModule(**ckpt["hyper_parameters"])`` + state dict, as a trained run's checkpoint holds them."""
    from omegaconf import OmegaConf

    from t2i.cli.evaluate import run
    from t2i.lit.spade import SPADEModule

    monkeypatch.setattr(spade_lib, "module_class", REAL_MODULE_CLASS)
    with initialize_config_module("t2i.conf", version_base="1.3"):
        cfg = compose("train", overrides=["experiment=shapes_spade", f"paths.root_dir={tmp_path}"])
    hp = OmegaConf.to_container(cfg.model, resolve=True)
    hp.pop("_target_")
    torch.manual_seed(0)
    module = SPADEModule(**hp)
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, tmp_path / "s.ckpt")
    res = synth.run(synth_cfg(tmp_path, f"ckpt={tmp_path}/s.ckpt", f"maps={layouts}/test", "style=random",
                              "num_styles=2", "limit=3"))
    label = torch.from_numpy(np.asarray(Image.open(sorted((layouts / "test" / "labels").glob("*.png"))[1]))
                             .astype(np.int64))
    want = module.generate(label[None], style="random", generator=torch.Generator().manual_seed(1))[0]
    assert torch.allclose(res["images"][1, 1], want, atol=1e-5)  # map 1, style 1: seed 0 + 1
    assert not torch.allclose(res["images"][:, 0], res["images"][:, 1])  # the style encoder's z matters
    m = run(eval_cfg(tmp_path, f"ckpt={tmp_path}/s.ckpt", "eval.num_maps=4", "metrics.extractor=null"))
    assert m["splits"]["test"]["diversity_l1"] > 0 and 0 <= m["summary"]["layout_all"] <= 1


def test_synthesizer_api_gives_the_commands_images(tmp_path, layouts):
    from PIL import Image

    from t2i import Synthesizer

    ckpt = save_standin(tmp_path / "spade.ckpt")
    res = synth.run(synth_cfg(tmp_path, f"ckpt={ckpt}", f"maps={layouts}/test", "style=random", "num_styles=3",
                              "limit=4"))
    synth_api = Synthesizer.from_checkpoint(ckpt, device="cpu")
    maps = [Image.open(layouts / "test" / "labels" / f"{stem}.png") for stem in res["stems"]]
    out = synth_api(maps, style="random", num_styles=3, seed=0)
    assert torch.equal(out.pixels, res["images"]) and [k for k, _ in out.styles] == ["random"] * 3
    assert len(out.images) == 4 and all(len(row) == 3 and row[0].size == (32, 32) for row in out.images)
    again = synth_api(torch.stack([torch.from_numpy(np.asarray(m).astype(np.int64)) for m in maps]),
                      style="random", num_styles=3, seed=0)
    assert torch.equal(again.pixels, out.pixels)  # tensors or PIL maps: the same images
    with pytest.raises(ConfigError, match=r"label_maps hold class ids 99\.\.99; the model knows 0\.\.24"):
        synth_api(torch.full((1, 32, 32), 99), style=None)
    with pytest.raises(ConfigError, match="label_maps\\[0\\] is a RGB image"):
        synth_api([Image.new("RGB", (32, 32))])
    with pytest.raises(ConfigError, match="num_styles=0 must be an integer >= 1"):
        synth_api(maps, style="random", num_styles=0)
