"""Shapes benchmark: generator, captions and parser, splits, writer, and the rule-based oracle."""

import base64
import io
import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from t2i.data import oracle
from t2i.data.shapes import (
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    SPLITS,
    TEMPLATES,
    ShapeSpec,
    allowed_pairs,
    caption,
    captions,
    held_out_pairs,
    make_split,
    parse_caption,
    render,
    write_shapes,
)

ALL_SPECS = [ShapeSpec(*v) for v in itertools.product(COLORS, SHAPES, POSITIONS, SIZES)]


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(image: Image.Image, quality: int = 75) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


# -- specs, rendering, determinism ------------------------------------------------------------
def test_spec_round_trip_and_validation():
    spec = ShapeSpec("red", "circle", "top_left", "large")
    assert ShapeSpec.from_dict(spec.to_dict()) == spec
    assert ShapeSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(ValueError):
        ShapeSpec("pink", "circle", "top_left", "large")


@pytest.mark.parametrize("size", [32, 48, 64, 100, 256])
def test_render_size_and_determinism(size):
    spec = ShapeSpec("blue", "triangle", "bottom_right", "small")
    a = render(spec, size, rng=np.random.default_rng(3))
    b = render(spec, size, rng=np.random.default_rng(3))
    assert a.size == (size, size) and a.mode == "RGB"
    assert a.tobytes() == b.tobytes()
    assert a.getpixel((0, 0)) == (255, 255, 255)


def test_split_determinism():
    a = make_split("train", 20, seed=0)
    b = make_split("train", 20, seed=0)
    assert [s.key for s in a] == [s.key for s in b]
    assert [s.spec for s in a] == [s.spec for s in b]
    assert [s.captions for s in a] == [s.captions for s in b]
    assert all(_png_bytes(x.image) == _png_bytes(y.image) for x, y in zip(a, b))
    # sample i does not depend on n
    assert [s.image.tobytes() for s in make_split("train", 5, seed=0)] == [s.image.tobytes() for s in a[:5]]
    # another seed or split draws other samples
    other_seed = make_split("train", 20, seed=1)
    assert sum(x.image.tobytes() != y.image.tobytes() for x, y in zip(a, other_seed)) >= 18
    for split in ("val", "test"):
        other = make_split(split, 20, seed=0)
        assert sum(x.image.tobytes() != y.image.tobytes() for x, y in zip(a, other)) >= 18
        assert {s.key for s in other}.isdisjoint(s.key for s in a)


def test_samples_carry_all_templates():
    for lang in ("zh", "en"):
        for s in make_split("val", 10, lang=lang, image_size=32):
            assert s.captions == captions(s.spec, lang)
            assert s.caption == s.captions[s.template]
            assert s.image.size == (32, 32)


# -- compositional split --------------------------------------------------------------------------
def test_held_out_pairs_cover_every_colour_and_keep_every_shape_in_training():
    held = held_out_pairs()
    assert {c for c, _ in held} == set(COLORS)
    train_pairs = set(allowed_pairs("train"))
    assert {c for c, _ in train_pairs} == set(COLORS)
    assert {s for _, s in train_pairs} == set(SHAPES)
    assert train_pairs.isdisjoint(held)
    assert set(allowed_pairs("compositional")) == set(held)


def test_splits_respect_held_out_pairs():
    held = set(held_out_pairs())
    for split in SPLITS:
        pairs = {(s.spec.color, s.spec.shape) for s in make_split(split, 200, image_size=32)}
        if split == "compositional":
            assert pairs <= held
        else:
            assert pairs.isdisjoint(held)
    train = make_split("train", 500, image_size=32)
    assert {s.spec.color for s in train} == set(COLORS)
    assert {s.spec.shape for s in train} == set(SHAPES)
    assert {s.spec.position for s in train} == set(POSITIONS)
    assert {s.spec.size for s in train} == set(SIZES)


# -- captions ----------------------------------------------------------------------------------
def test_templates_per_language():
    for lang in ("zh", "en"):
        assert len(TEMPLATES[lang]) >= 3
        caps = captions(ALL_SPECS[0], lang)
        assert len(caps) == len(TEMPLATES[lang]) and len(set(caps)) == len(caps)
    assert caption(ShapeSpec("red", "circle", "top_left", "large"), "zh", 0) == "一个大的红色圆形在左上角"
    assert caption(ShapeSpec("red", "circle", "top_left", "large"), "en", 0) == "a large red circle in the top left"


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_parse_caption_inverts_every_template(lang):
    for spec in ALL_SPECS:
        for text in captions(spec, lang):
            assert parse_caption(text, lang) == spec, text
            assert parse_caption(text) == spec, text  # language guessed


def test_parse_caption_rejects_incomplete_or_ambiguous():
    assert parse_caption("") is None
    assert parse_caption("a red circle") is None  # no size, no position
    assert parse_caption("a large red blue circle in the top left") is None
    assert parse_caption("一个红色圆形") is None
    assert parse_caption("A BIG Red Circle, Top-Left") == ShapeSpec("red", "circle", "top_left", "large")


# -- oracle ------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [32, 64, 128, 256])
def test_oracle_reads_ground_truth(size):
    samples = make_split("test", 300, image_size=size)
    result = oracle.score([s.image for s in samples], [s.spec for s in samples])
    assert result["n"] == 300
    assert result["all"] >= 0.99, result


def test_oracle_reads_every_spec_unjittered():
    images = [render(spec, 64) for spec in ALL_SPECS]
    assert oracle.score(images, ALL_SPECS)["all"] == 1.0
    assert oracle.read_spec(images[0]) == ALL_SPECS[0]


# The README promises >= 99% after JPEG q75 or a 1 px blur from 48 px up. At 32 px a small shape
# is a few pixels across and both degradations cost shape reads (JPEG colour reads too): ~91% of
# 300 read fully right today, held to a weaker, documented bound.
@pytest.mark.parametrize("degrade", ["jpeg", "blur"])
@pytest.mark.parametrize("size, bound", [(32, 0.85), (48, 0.99), (64, 0.99), (128, 0.99)])
def test_oracle_is_robust(degrade, size, bound):
    samples = make_split("test", 300, image_size=size)
    if degrade == "jpeg":
        images = [_jpeg(s.image, 75) for s in samples]
    else:
        images = [s.image.filter(ImageFilter.GaussianBlur(1)) for s in samples]
    result = oracle.score(images, [s.spec for s in samples])
    assert result["all"] >= bound, result


def _random_blobs(rng, n, size=64):
    images = []
    for _ in range(n):
        image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(1, 4))):
            x, y = rng.uniform(0, size, 2)
            rx, ry = rng.uniform(3, size / 3, 2)
            draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        images.append(image)
    return images


def test_oracle_is_near_chance_on_noise():
    rng = np.random.default_rng(0)
    specs = [s.spec for s in make_split("test", 400, image_size=32)]
    chance = {"color": 1 / len(COLORS), "shape": 1 / len(SHAPES), "position": 1 / len(POSITIONS), "size": 1 / len(SIZES)}
    noise = rng.integers(0, 256, size=(400, 64, 64, 3), dtype=np.uint8)
    for images in (noise, _random_blobs(rng, 400)):
        result = oracle.score(images, specs)
        assert result["all"] < 0.05, result
        for attr, p in chance.items():
            assert result[attr] < p + 0.12, (attr, result)


def test_oracle_blank_image_counts_as_wrong():
    blank = Image.new("RGB", (64, 64), (255, 255, 255))
    assert oracle.read(blank) == dict.fromkeys(oracle.ATTRIBUTES)
    assert oracle.read_spec(blank) is None
    result = oracle.score([blank], [ALL_SPECS[0]])
    assert result["all"] == 0 and result["color"] == 0


def test_score_accepts_pil_numpy_and_torch():
    samples = make_split("compositional", 40, image_size=64)
    specs = [s.spec for s in samples]
    pil = [s.image for s in samples]
    array = np.stack([np.asarray(im) for im in pil])
    tensor = torch.from_numpy(array).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    expected = oracle.score(pil, specs)
    assert expected["all"] == 1.0
    assert oracle.score(array, specs) == expected
    assert oracle.score(tensor, specs) == expected
    assert oracle.score(tensor.numpy(), specs) == expected
    assert oracle.score(pil, [s.to_dict() for s in specs]) == expected
    assert oracle.read(tensor[0])["shape"] == specs[0].shape


# -- writer -----------------------------------------------------------------------------------
def test_write_shapes(tmp_path):
    counts = {"train": 30, "val": 6, "test": 5, "compositional": 7}
    paths = write_shapes(tmp_path, n_train=30, n_val=6, n_test=5, n_compositional=7, image_size=32,
                         lang="zh", seed=3, progress=False)
    meta = json.loads(paths["meta"].read_text(encoding="utf-8"))
    assert meta["counts"] == counts and meta["seed"] == 3 and meta["image_size"] == 32 and meta["lang"] == "zh"
    assert [tuple(p) for p in meta["held_out_pairs"]] == held_out_pairs()
    assert meta["vocab"]["color"] == list(COLORS)
    for split, n in counts.items():
        tsv, jsonl = paths[f"{split}_tsv"], paths[f"{split}_jsonl"]
        assert tsv == tmp_path / f"shapes_{split}.tsv"
        rows = [line.split("\t") for line in tsv.read_text(encoding="utf-8").splitlines()]
        records = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
        assert len(rows) == len(records) == n
        for (key, text, b64), record in zip(rows, records):
            image = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
            assert image.format == "PNG" and image.size == (32, 32)
            spec = ShapeSpec.from_dict(record["spec"])
            assert key == record["key"]
            assert text in record["captions"] and record["captions"] == captions(spec, "zh")
            assert parse_caption(text) == spec
            assert oracle.read_spec(image) == spec
    # same arguments -> same bytes
    again = write_shapes(tmp_path / "again", n_train=30, n_val=6, n_test=5, n_compositional=7, image_size=32,
                         lang="zh", seed=3, progress=False)
    assert again["train_tsv"].read_bytes() == paths["train_tsv"].read_bytes()


def test_write_shapes_english(tmp_path):
    paths = write_shapes(tmp_path, n_train=4, n_val=1, n_test=1, n_compositional=1, lang="en", progress=False)
    for line in paths["train_tsv"].read_text(encoding="utf-8").splitlines():
        text = line.split("\t")[1]
        assert text.isascii() and parse_caption(text, "en") is not None
