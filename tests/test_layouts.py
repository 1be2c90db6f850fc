"""Label-map data for SPADE (issue 21): Shapes layouts (deterministic, class map = rendered pixels, the layout
oracle reads them back and rejects shuffled maps), the ADE20K / COCO-Stuff / Cityscapes folder readers on tiny
hand-made folders with bad pairs counted, and LabelMapDataModule batches."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from t2i.data.layouts import (
    BAD_LABEL,
    LABEL_OUT_OF_RANGE,
    MISSING_LABEL,
    NUM_LAYOUT_CLASSES,
    SIZE_MISMATCH,
    LabelMapDataModule,
    LayoutSkipLog,
    class_attributes,
    fit_pair,
    layout_class,
    make_layouts,
    open_label_source,
    read_specs,
    render_layout,
    write_shapes_layout,
)
from t2i.data.oracle import layout_accuracy, layout_objects
from t2i.data.shapes import BACKGROUND, COLORS, POSITIONS, SHAPES
from t2i.data.skips import BAD_IMAGE, MISSING_IMAGE, DataError


# -- Shapes layouts ---------------------------------------------------------------------------------------
def test_class_ids_cover_every_colour_shape_pair():
    ids = [layout_class(c, s) for c in COLORS for s in SHAPES]
    assert sorted(ids) == list(range(1, NUM_LAYOUT_CLASSES)) and NUM_LAYOUT_CLASSES == 25
    assert layout_class("red", "circle") == 1 and layout_class("yellow", "square") == 1 + 4 + 1
    assert all(class_attributes(layout_class(c, s)) == (c, s) for c in COLORS for s in SHAPES)
    assert class_attributes(0) is None


def test_layouts_are_deterministic_and_sample_i_does_not_depend_on_n_or_size():
    a = make_layouts("train", 6, seed=3, image_size=32)
    b = make_layouts("train", 10, seed=3, image_size=32)
    c = make_layouts("train", 6, seed=3, image_size=64)
    for x, y, z in zip(a, b, c):
        assert x.key == y.key and x.spec == y.spec == z.spec
        assert np.array_equal(np.asarray(x.image), np.asarray(y.image)) and np.array_equal(x.label, y.label)
    assert [s.spec for s in make_layouts("val", 6, seed=3)] != [s.spec for s in a]
    assert [s.spec for s in make_layouts("train", 6, seed=4)] != [s.spec for s in a]
    counts = [len(s.spec.objects) for s in make_layouts("test", 60)]
    assert min(counts) == 1 and max(counts) == 3
    for s in a:  # distinct cells; the map holds exactly the objects' classes, one per cell
        cells = [o.position for o in s.spec.objects]
        assert len(set(cells)) == len(cells)
        objs = layout_objects(s.label)
        assert sorted((o["cell"], o["cls"]) for o in objs) == sorted((o.position, o.cls) for o in s.spec.objects)


@pytest.mark.parametrize("size", [32, 64])
def test_class_map_matches_the_rendered_pixels(size):
    """A pixel carries class k exactly when it is at least half object k's colour (its coverage >= 1/2)."""
    bg = np.asarray(BACKGROUND, dtype=np.float64)
    for s in make_layouts("test", 20, image_size=size):
        img = np.asarray(s.image, dtype=np.float64)
        for o in s.spec.objects:
            d = np.asarray(COLORS[o.color], dtype=np.float64) - bg
            a = (img - bg) @ d / (d @ d)  # coverage of this colour at every pixel
            resid = np.linalg.norm(img - bg - a[..., None] * d, axis=-1)
            mine = s.label == o.cls
            assert mine.any()
            assert (a[mine] >= 0.5 - 1 / 255).all() and (resid[mine] < 3).all()
            cell = POSITIONS.index(o.position)
            r, c = divmod(cell, 3)
            rows = slice(int(np.ceil(r * size / 3)), int((r + 1) * size // 3))
            cols = slice(int(np.ceil(c * size / 3)), int((c + 1) * size // 3))
            inside = np.zeros_like(mine)
            inside[rows, cols] = True
            others = inside & ~mine  # pixels of the object's cell labelled background: covered less than half
            assert (a[others] < 0.5 + 1 / 255).all()
        assert (s.label == 0).sum() > 0
        far = s.label == 0
        assert np.abs(img[far] - bg).max(axis=-1).mean() < 20  # background pixels are (nearly) white


@pytest.mark.parametrize("size", [32, 64])
def test_oracle_reads_real_layouts_and_rejects_shuffled_maps(size):
    samples = make_layouts("test", 120, image_size=size)
    images, maps = [s.image for s in samples], [s.label for s in samples]
    real = layout_accuracy(images, maps)
    assert real["all"] == 1.0 and real["objects"] == 1.0 and real["n"] == 120 and real["n_objects"] > 120
    assert layout_accuracy(images, [s.spec for s in samples]) == real  # specs render to the same maps
    perm = np.random.default_rng(0).permutation(len(samples))
    shuffled = layout_accuracy(images, [maps[i] for i in perm])
    assert shuffled["all"] < 0.1 and shuffled["objects"] < 0.1
    tensor = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images]).float() / 127.5 - 1
    assert layout_accuracy(tensor, maps) == real  # float [-1, 1] tensors read like PIL images


def test_oracle_checks_colour_shape_and_position_separately():
    s = make_layouts("test", 40, image_size=64)
    one = next(x for x in s if len(x.spec.objects) == 1)
    o = one.spec.objects[0]
    other_colour = next(c for c in COLORS if c != o.color)
    other_shape = next(sh for sh in SHAPES if sh != o.shape)
    moved = next(p for p in POSITIONS if p != o.position)
    from t2i.data.layouts import LayoutObject, LayoutSpec

    for changed, wrong in ((dict(color=other_colour), "color"), (dict(shape=other_shape), "shape"),
                           (dict(position=moved), "position")):
        fields = dict(color=o.color, shape=o.shape, position=o.position, size=o.size, jitter=o.jitter) | changed
        image, _ = render_layout(LayoutSpec((LayoutObject(**fields),)), 64)
        acc = layout_accuracy([image], [one.label])
        assert acc[wrong] == 0.0 and acc["all"] == 0.0, (wrong, acc)
        if wrong != "position":  # the object is still where the map says
            assert acc["position"] == 1.0


def test_write_shapes_layout_folders_and_specs(tmp_path):
    paths = write_shapes_layout(tmp_path / "sl", n_train=4, n_val=2, n_test=3, image_size=32, progress=False)
    meta = json.loads(paths["meta"].read_text())
    assert meta["num_classes"] == 25 and meta["counts"] == {"train": 4, "val": 2, "test": 3}
    test = tmp_path / "sl" / "test"
    specs = read_specs(test)
    want = make_layouts("test", 3, image_size=32)
    assert list(specs) == [s.key for s in want] and [specs[s.key] for s in want] == [s.spec for s in want]
    for s in want:
        label = np.asarray(Image.open(test / "labels" / f"{s.key}.png"))
        assert label.dtype == np.uint8 and np.array_equal(label, s.label)
        assert np.array_equal(np.asarray(Image.open(test / "images" / f"{s.key}.png")), np.asarray(s.image))


# -- folder readers ------------------------------------------------------------------------------------------
def _img(path, size=(8, 6), seed=0, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, format=fmt)


def _map(path, values, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(values, dtype=np.uint8 if mode == "L" else np.uint16)).save(path)  # L or I;16


def _ids(h=6, w=8, hi=5, seed=0):
    return np.random.default_rng(seed).integers(0, hi, (h, w))


def load_all(dm, split):
    """Every item of a split through the dataset: (good keys, {reason: count}) of the load-time checks."""
    ds = dm.datasets[split]
    good, bad = [], {}
    for i in range(len(ds)):
        item = ds[i]
        if "bad" in item:
            bad[item["bad"][0]] = bad.get(item["bad"][0], 0) + 1
        else:
            good.append(item["key"])
    return good, bad


def test_ade20k_reader_counts_every_bad_pair(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    img, ann = root / "images" / "training", root / "annotations" / "training"
    for i in range(6):
        _img(img / f"ADE_train_{i:08d}.jpg", seed=i)
        _map(ann / f"ADE_train_{i:08d}.png", _ids(hi=151, seed=i))
    _img(img / "ADE_train_nolabel.jpg")                       # missing label
    _map(ann / "ADE_train_noimage.png", _ids())                # missing image
    (img / "ADE_train_broken.jpg").write_bytes(b"not a jpeg")   # undecodable image
    _map(ann / "ADE_train_broken.png", _ids())
    _img(img / "ADE_train_small.jpg", size=(4, 4))              # size mismatch
    _map(ann / "ADE_train_small.png", _ids())
    _img(img / "ADE_train_range.jpg")                           # class id 200 > 150
    _map(ann / "ADE_train_range.png", np.full((6, 8), 200))
    _img(img / "ADE_train_badmap.jpg")                          # undecodable map
    (ann / "ADE_train_badmap.png").write_bytes(b"\x89PNG broken")
    dm = LabelMapDataModule(source="ade20k", root=tmp_path, train="train", val=None, test=None, image_size=4,
                            num_classes=151, num_workers=0, max_bad_fraction=0.5)
    dm.setup("fit")
    assert dict(dm.index_logs["train"].by_reason) == {MISSING_LABEL: 1, MISSING_IMAGE: 1}
    good, bad = load_all(dm, "train")
    assert bad == {BAD_IMAGE: 1, SIZE_MISMATCH: 1, LABEL_OUT_OF_RANGE: 1, BAD_LABEL: 1}
    assert sorted(good) == [f"ADE_train_{i:08d}" for i in range(6)]
    strict = LabelMapDataModule(source="ade20k", root=root, train="train", val=None, test=None, num_classes=151,
                                num_workers=0, max_bad_fraction=0.1)
    with pytest.raises(DataError, match="max_bad_fraction=0.1"):
        strict.setup("fit")  # 2 of 12 pairs lack a partner: past 10%


def test_coco_stuff_maps_255_to_unlabeled_and_shifts_the_rest(tmp_path):
    ids = np.array([[0, 181, 255], [5, 255, 100]])
    _img(tmp_path / "val2017" / "000000000001.jpg", size=(3, 2))
    _map(tmp_path / "stuffthingmaps_trainval2017" / "val2017" / "000000000001.png", ids)
    src = open_label_source("coco_stuff", tmp_path, "val")
    pairs = src.pairs(LayoutSkipLog())
    _, label, inst = src.load(pairs[0])
    assert src.num_classes == 183 and inst is None
    assert np.array_equal(label, [[1, 182, 0], [6, 0, 101]])


def test_cityscapes_reader_pairs_across_city_folders_with_instances(tmp_path):
    for city, n in (("aachen", 2), ("bochum", 1)):
        for i in range(n):
            stem = f"{city}_{i:06d}_000019"
            _img(tmp_path / "leftImg8bit" / "train" / city / f"{stem}_leftImg8bit.png", seed=i, fmt="PNG")
            _map(tmp_path / "gtFine" / "train" / city / f"{stem}_gtFine_labelIds.png", _ids(hi=34, seed=i))
            inst = np.where(_ids(seed=i) > 2, 26000 + i, 7)
            _map(tmp_path / "gtFine" / "train" / city / f"{stem}_gtFine_instanceIds.png", inst, mode="I;16")
    _img(tmp_path / "leftImg8bit" / "train" / "bochum" / "bochum_000009_000019_leftImg8bit.png", fmt="PNG")
    _map(tmp_path / "gtFine" / "train" / "bochum" / "bochum_000009_000019_gtFine_labelIds.png", _ids())
    dm = LabelMapDataModule(source="cityscapes", root=tmp_path, train="train", val=None, test=None, image_size=4,
                            aspect_ratio=2.0, num_classes=35, has_instances=True, num_workers=0, batch_size=8,
                            max_bad_fraction=0.5)
    dm.setup("fit")
    assert dict(dm.index_logs["train"].by_reason) == {"missing_instance": 1}
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert sorted(batch["key"]) == ["aachen_000000_000019", "aachen_000001_000019", "bochum_000000_000019"]
    assert batch["image"].shape == (3, 3, 4, 8) and batch["label"].shape == batch["instance"].shape == (3, 4, 8)
    assert set(batch["instance"].unique().tolist()) <= {7, 26000, 26001}  # NEAREST: no blended ids


def test_missing_dataset_folder_is_one_clear_error(tmp_path):
    dm = LabelMapDataModule(source="ade20k", root=tmp_path / "nope", num_classes=151, num_workers=0)
    with pytest.raises(DataError, match="data.root=.*nope: no such folder"):
        dm.setup("fit")


def test_fit_pair_keeps_maps_nearest_and_flips_image_and_map_together():
    import random

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8))
    label = rng.integers(0, 3, (30, 40)) * 50  # ids 0, 50, 100
    pixels, (lab,) = fit_pair(image, [label], 16, 16)
    assert pixels.shape == (16, 16, 3) and set(np.unique(lab)) <= {0, 50, 100}
    flips = 0
    for seed in range(6):
        a, (la,) = fit_pair(image, [label], 16, 16, rng=random.Random(seed), flip=True)
        b, (lb,) = fit_pair(image, [label], 16, 16, rng=random.Random(seed), flip=False)
        if not np.array_equal(a, b):
            flips += 1
            assert np.array_equal(a, b[:, ::-1]) and np.array_equal(la, lb[:, ::-1])
    assert 0 < flips < 6


def test_shapes_layout_datamodule_builds_and_yields_batches_the_oracle_reads(tmp_path):
    dm = LabelMapDataModule(root=tmp_path / "sl", image_size=32, num_workers=0, batch_size=8, random_flip=True,
                            shapes_layout=dict(n_train=16, n_val=8, n_test=8, image_size=32))
    dm.prepare_data()
    dm.setup("fit")
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert batch["image"].shape == (8, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert -1 <= batch["image"].min() and batch["image"].max() <= 1
    assert batch["label"].dtype == torch.long and batch["label"].max() < 25 and "instance" not in batch
    assert layout_accuracy(batch["image"], list(batch["label"]))["all"] == 1.0  # flips keep image and map together
    assert set(dm.specs) >= set(batch["key"])
    mtime = (tmp_path / "sl" / "meta.json").stat().st_mtime_ns
    dm.prepare_data()  # the same layouts on disk: not rebuilt
    assert (tmp_path / "sl" / "meta.json").stat().st_mtime_ns == mtime
