"""Data-format readers: exact keys, captions, skip counts by reason and skip locations."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from PIL import Image

from t2i.data.base import Record, b64decode
from t2i.data.formats import COCOCN, MUGE, SOURCES, EasyNLPTSV, ImageFolder, open_source
from t2i.data.skips import REASONS, BadSample, DataError, SkipLog
from t2i.data.wds import WebDataset, check_tar, decode_wds_sample, split_member
from tests.fixtures import (
    b64,
    encode,
    jpeg,
    make_image,
    png,
    same_pixels,
    truncated_jpeg,
    write_lines,
    write_tar,
)


def run(source):
    """Iterate a source fully: {key: (image, captions)} and its log."""
    out = {key: (image, captions) for key, image, captions in source}
    return out, source.log


# -- base64 ---------------------------------------------------------------------------------


def test_b64decode_accepts_standard_urlsafe_and_unpadded():
    data = png(3)
    std = b64(data)
    assert "=" in std and ("+" in std or "/" in std)  # the variants below really differ
    for text in (std, b64(data, urlsafe=True), b64(data, pad=False), b64(data, urlsafe=True, pad=False)):
        assert b64decode(text, "x:1") == data
    for bad in ("!!!", "abcde", "", "一二三"):
        with pytest.raises(BadSample) as e:
            b64decode(bad, "f.tsv:7")
        assert (e.value.reason, e.value.where) == ("bad_base64", "f.tsv:7")


# -- EasyNLP TSV ----------------------------------------------------------------------------


@pytest.fixture
def easynlp(tmp_path):
    path = write_lines(
        tmp_path / "train.tsv",
        [
            f"1\t一只猫\t{b64(png(1))}",
            f"2\t 两只狗 \t{b64(png(2), urlsafe=True)}",
            f"3\t红色的花\t{b64(png(3), pad=False)}",
            "4\t坏的\t!!!not-base64!!!",
            f"5\t截断\t{b64(truncated_jpeg(5))}",
            "6\tonly two columns",
            f"7\t   \t{b64(png(7))}",
            b"8\t\xff\xfe bad\t" + b64(png(8)).encode(),
            "",
            f"1\t重复的编号\t{b64(jpeg(10))}",
            "9\ta\tb\tc",
        ],
    )
    return path


def test_easynlp_records_and_parse_skips(easynlp):
    log = SkipLog(name="t")
    recs = EasyNLPTSV(easynlp).records(log)
    assert [r.key for r in recs] == ["1", "2", "3", "4", "5"]  # the repeated id 1 (line 10) is a duplicate
    assert [r.captions for r in recs] == [
        ["一只猫"],
        ["两只狗"],
        ["红色的花"],
        ["坏的"],
        ["截断"],
    ]
    assert [r.where for r in recs] == [f"{easynlp}:{n}" for n in (1, 2, 3, 4, 5)]
    assert all(isinstance(r.ref, tuple) and r.ref[0] == easynlp for r in recs)  # offsets, not payloads
    assert log.n_ok == 0
    assert dict(log.by_reason) == {"bad_columns": 2, "empty_caption": 1, "bad_utf8": 1, "duplicate": 1}
    assert log.examples["duplicate"] == [f"{easynlp}:10"]
    assert log.examples["bad_columns"] == [f"{easynlp}:6", f"{easynlp}:11"]
    assert log.examples["empty_caption"] == [f"{easynlp}:7"]
    assert log.examples["bad_utf8"] == [f"{easynlp}:8"]


def test_easynlp_iteration_loads_images_and_counts_load_failures(easynlp):
    got, log = run(EasyNLPTSV(easynlp))
    assert list(got) == ["1", "2", "3"]
    assert got["2"][1] == ["两只狗"]
    for key, seed in (("1", 1), ("2", 2), ("3", 3)):
        assert got[key][0].mode == "RGB" and same_pixels(got[key][0], make_image(seed))
    assert log.n_ok == 3
    assert dict(log.by_reason) == {
        "duplicate": 1,
        "bad_columns": 2,
        "empty_caption": 1,
        "bad_utf8": 1,
        "bad_base64": 1,
        "bad_image": 1,
    }
    assert log.examples["bad_base64"] == [f"{easynlp}:4"]
    assert log.examples["bad_image"] == [f"{easynlp}:5"]
    assert log.summary() == "\n".join(
        [
            "easynlp_tsv: 3 ok, 7 skipped (70.00%)",
            f"  bad_columns: 2 (e.g. {easynlp}:6, {easynlp}:11)",
            f"  bad_base64: 1 (e.g. {easynlp}:4)",
            f"  bad_image: 1 (e.g. {easynlp}:5)",
            f"  bad_utf8: 1 (e.g. {easynlp}:8)",
            f"  duplicate: 1 (e.g. {easynlp}:10)",
            f"  empty_caption: 1 (e.g. {easynlp}:7)",
        ]
    )
    # a fresh reader counts the same; a second pass over one reader starts its log afresh
    assert run(EasyNLPTSV(easynlp))[1].to_dict() == log.to_dict()
    src = EasyNLPTSV(easynlp)
    list(src)
    list(src)
    assert src.log.to_dict() == log.to_dict()


def test_check_raises_naming_worst_file_only_past_the_limit(easynlp, tmp_path):
    _, log = run(EasyNLPTSV(easynlp))
    other = SkipLog()
    other.skip("bad_image", f"{tmp_path / 'other.tsv'}:3")
    log.merge(other)
    log.max_bad_fraction = 0.5
    with pytest.raises(DataError) as e:
        log.check()
    assert f"worst file: {easynlp} (7 bad)" in str(e.value)
    assert "8 of 11 samples were bad" in str(e.value)
    log.max_bad_fraction = 0.75
    log.check()


def test_easynlp_load_raises_badsample_never_raw_errors(easynlp):
    src = EasyNLPTSV(easynlp)
    recs = {r.key: r for r in src.records(SkipLog())}
    for key, reason in (("4", "bad_base64"), ("5", "bad_image")):
        with pytest.raises(BadSample) as e:
            src.load(recs[key])
        assert (e.value.reason, e.value.where) == (reason, recs[key].where)
    with pytest.raises(BadSample) as e:
        src.load(Record("x", ["c"], None, "f.tsv:1"))
    assert e.value.reason == "missing_image"
    with pytest.raises(BadSample) as e:
        src.load(Record("x", ["c"], b"not an image", "f.tsv:2"))
    assert e.value.reason == "bad_image"


def test_easynlp_two_column_file(tmp_path):
    path = write_lines(
        tmp_path / "test.tsv",
        [b"\xef\xbb\xbfa\tcap a", "b\t  cap b ", "c\t ", "d\tx\ty", "a\tcap a again"],
    )
    # captions only while images are required: one error about the file, not a row of missing_image
    log = SkipLog()
    with pytest.raises(DataError) as e:
        EasyNLPTSV(path, key="input").records(log)
    msg = str(e.value)
    assert f"input={path}: no image column (4 of 5 lines" in msg and "`require_images=false`" in msg
    assert log.n_bad == 0
    with pytest.raises(DataError, match="`require_images: false` in the data.test entry"):
        EasyNLPTSV(path, key="data.test").records(SkipLog())

    log = SkipLog()
    src = EasyNLPTSV(path, require_images=False)
    recs = src.records(log)
    assert [(r.key, r.captions, r.ref) for r in recs] == [("a", ["cap a"], None), ("b", ["cap b"], None)]
    assert dict(log.by_reason) == {"empty_caption": 1, "bad_columns": 1, "duplicate": 1}
    assert log.examples["duplicate"] == [f"{path}:5"]  # the repeated id: the first line is kept
    assert src.read_captions(SkipLog()) == [("a", "cap a"), ("b", "cap b")]
    with pytest.raises(BadSample) as e:
        src.load(recs[0])
    assert e.value.reason == "missing_image"


def test_easynlp_read_captions_of_a_three_column_file(easynlp):
    caps = EasyNLPTSV(easynlp).read_captions(SkipLog())
    assert caps[:3] == [("1", "一只猫"), ("2", "两只狗"), ("3", "红色的花")]
    assert len(caps) == 5


def test_missing_path_names_path_and_key(tmp_path):
    missing = tmp_path / "nope.tsv"
    with pytest.raises(DataError) as e:
        EasyNLPTSV(missing, key="data.train")
    assert "data.train" in str(e.value) and str(missing) in str(e.value)
    with pytest.raises(DataError) as e:
        open_source("folder", root=tmp_path / "no_dir", key="input")
    assert "input=" in str(e.value) and "no_dir" in str(e.value)
    with pytest.raises(DataError) as e:
        EasyNLPTSV(None, key="data.val")
    assert "data.val is not set" in str(e.value)


# -- MUGE -----------------------------------------------------------------------------------


@pytest.fixture
def muge(tmp_path):
    d = tmp_path / "muge" / "ECommerce-T2I"
    text = write_lines(
        d / "T2I_train.text.tsv",
        [
            "100\t连衣裙",
            "100\t  红色连衣裙 ",
            "101\t没有图片的衬衫",
            "102\t  ",
            b"103\t\xff\xfe",
            "104",
            "105\t鞋子",
            "106\t帽子",
            "107\t包",
            "101\t又一条没有图片",
        ],
    )
    img = write_lines(
        d / "T2I_train.img.tsv",
        [
            f"100\t{b64(png(100))}",
            f"102\t{b64(png(102))}",
            f"103\t{b64(png(103))}",
            f"105\t{b64(png(105), urlsafe=True, pad=False)}",
            "106\t%%%",
            f"107\t{b64(truncated_jpeg(7))}",
            f"108\t{b64(png(108))}",
            "109",
            f"100\t{b64(png(1))}",  # repeated id: the first line is kept
            f"105\t{b64(png(2))}",
        ],
    )
    write_lines(d / "T2I_test.text.tsv", ["200\t测试一", "201\t测试二", "201\t测试二之二"])
    return tmp_path / "muge", text, img


def test_muge_join_and_skips(muge):
    root, text, img = muge
    log = SkipLog()
    recs = MUGE(root, "train").records(log)
    assert [(r.key, r.captions, r.where) for r in recs] == [
        ("100", ["连衣裙", "红色连衣裙"], f"{img}:1"),
        ("105", ["鞋子"], f"{img}:4"),
        ("106", ["帽子"], f"{img}:5"),
        ("107", ["包"], f"{img}:6"),
    ]
    assert dict(log.by_reason) == {
        "missing_image": 2,
        "empty_caption": 1,
        "bad_utf8": 1,
        "bad_columns": 2,
        "missing_caption": 1,
        "duplicate": 2,
    }
    assert log.examples["duplicate"] == [f"{img}:9", f"{img}:10"]
    assert log.examples["missing_image"] == [f"{text}:3", f"{text}:10"]
    assert log.examples["empty_caption"] == [f"{text}:4"]
    assert log.examples["bad_utf8"] == [f"{text}:5"]
    assert log.examples["bad_columns"] == [f"{text}:6", f"{img}:8"]
    assert log.examples["missing_caption"] == [f"{img}:7"]


def test_muge_iteration(muge):
    root, _, img = muge
    got, log = run(MUGE(root / "ECommerce-T2I", "train"))  # the folder holding the files works too
    assert list(got) == ["100", "105"]
    assert same_pixels(got["100"][0], make_image(100)) and same_pixels(got["105"][0], make_image(105))
    assert log.n_ok == 2
    assert log.by_reason["bad_base64"] == 1 and log.by_reason["bad_image"] == 1
    assert log.examples["bad_base64"] == [f"{img}:5"] and log.examples["bad_image"] == [f"{img}:6"]
    assert log.n_bad == 11


def test_muge_test_split_without_images(muge):
    root, _, _ = muge
    with pytest.raises(DataError) as e:
        MUGE(root, "test").records(SkipLog())
    assert "T2I_test.img.tsv" in str(e.value) and "read them with `require_images=false`" in str(e.value)
    with pytest.raises(DataError, match="`require_images: false` in the data.test entry of the data config"):
        MUGE(root, "test", key="data.test").records(SkipLog())
    src = MUGE(root, "test", require_images=False)
    recs = src.records(SkipLog())
    assert [(r.key, r.captions, r.ref) for r in recs] == [
        ("200", ["测试一"], None),
        ("201", ["测试二", "测试二之二"], None),
    ]
    assert src.read_captions() == [("200", "测试一"), ("201", "测试二"), ("201", "测试二之二")]


def test_muge_without_required_images_keeps_caption_only_ids(muge):
    root, text, _ = muge
    log = SkipLog()
    recs = MUGE(root, "train", require_images=False).records(log)
    assert [r.key for r in recs] == ["100", "105", "106", "107", "101"]
    assert recs[-1].ref is None and recs[-1].where == f"{text}:3"
    assert "missing_image" not in log.by_reason


def test_muge_missing_files(tmp_path):
    with pytest.raises(DataError) as e:
        MUGE(tmp_path, "val", key="data.val.root")
    assert "data.val.root=" in str(e.value) and "T2I_val.text.tsv" in str(e.value)


# -- COCO-CN --------------------------------------------------------------------------------


@pytest.fixture
def cococn(tmp_path):
    root = tmp_path / "coco-cn"
    images = tmp_path / "coco"
    split = write_lines(
        root / "coco-cn_val.txt",
        [
            "COCO_val2014_000000000001",
            "COCO_train2014_000000000002",
            "COCO_val2014_000000000003",
            "COCO_val2014_000000000004",
            "COCO_val2014_000000000005",
            "COCO_val2014_000000000006",
            "COCO_val2014_000000000001",  # listed twice: the first line is kept
            "COCO_train2014_000000000002.jpg",  # the same id, with the file suffix
        ],
    )
    caps = write_lines(
        root / "imageid.human-written-caption.txt",
        [
            "COCO_val2014_000000000001#0\t一个人在骑自行车",
            "COCO_val2014_000000000001#1\t 街上有人骑车 ",
            "COCO_train2014_000000000002#0\t桌子上有一个蛋糕",
            "COCO_val2014_000000000003#0\t没有图片",
            "COCO_val2014_000000000005#0\t   ",
            "COCO_val2014_000000000006#0\t截断的图片",
            b"COCO_val2014_000000000006#1\t\xff\xfe",
            "COCO_train2014_000000000099#0\t其他划分",
            "COCO_train2014_000000000099#1\t  ",
            "no tab on this line",
        ],
    )
    write_lines(root / "imageid.manually-translated-caption.txt", ["COCO_val2014_000000000001#0\t翻译的句子"])
    (images / "val2014").mkdir(parents=True)
    (images / "val2014" / "COCO_val2014_000000000001.jpg").write_bytes(jpeg(1))
    (images / "COCO_train2014_000000000002.jpg").write_bytes(jpeg(2))
    (images / "val2014" / "COCO_val2014_000000000004.jpg").write_bytes(jpeg(4))
    (images / "val2014" / "COCO_val2014_000000000006.jpg").write_bytes(truncated_jpeg(6))
    return root, images, split, caps


def test_cococn_records_and_skips(cococn):
    root, images, split, caps = cococn
    log = SkipLog()
    recs = COCOCN(root, "val", image_dir=images).records(log)
    assert [(r.key, r.captions, r.where) for r in recs] == [
        ("COCO_val2014_000000000001", ["一个人在骑自行车", "街上有人骑车"], f"{split}:1"),
        ("COCO_train2014_000000000002", ["桌子上有一个蛋糕"], f"{split}:2"),
        ("COCO_val2014_000000000006", ["截断的图片"], f"{split}:6"),
    ]
    assert recs[0].ref == images / "val2014" / "COCO_val2014_000000000001.jpg"
    assert recs[1].ref == images / "COCO_train2014_000000000002.jpg"
    assert dict(log.by_reason) == {
        "missing_image": 1,
        "missing_caption": 1,
        "empty_caption": 1,
        "bad_utf8": 1,
        "bad_columns": 1,
        "duplicate": 2,
    }
    assert log.examples["duplicate"] == [f"{split}:7", f"{split}:8"]
    assert log.examples["missing_image"] == [f"{split}:3"]
    assert log.examples["missing_caption"] == [f"{split}:4"]
    assert log.examples["empty_caption"] == [f"{caps}:5"]  # other splits' bad rows are not counted
    assert log.examples["bad_utf8"] == [f"{caps}:7"]
    assert log.examples["bad_columns"] == [f"{caps}:10"]

    got, log = run(COCOCN(root, "val", image_dir=images))
    assert list(got) == ["COCO_val2014_000000000001", "COCO_train2014_000000000002"]
    assert log.n_ok == 2 and log.examples["bad_image"] == [f"{split}:6"]


def test_cococn_caption_file_override_and_paths(cococn, tmp_path):
    root, images, _, _ = cococn
    src = COCOCN(root, "val", image_dir=images, caption_file="imageid.manually-translated-caption.txt")
    recs = src.records(SkipLog())
    assert [(r.key, r.captions) for r in recs] == [("COCO_val2014_000000000001", ["翻译的句子"])]
    with pytest.raises(DataError) as e:
        COCOCN(root, "val", image_dir=tmp_path / "no_images", key="data.path")
    assert "data.image_dir=" in str(e.value) and "no_images" in str(e.value)
    with pytest.raises(DataError) as e:
        COCOCN(root, "dev", image_dir=images)
    assert "coco-cn_dev.txt" in str(e.value)


# -- image folder ---------------------------------------------------------------------------


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    files = {
        "a.png": png(1),
        "a.txt": "猫\n\n  狗 \n".encode(),
        "sub/b.jpg": jpeg(2),
        "sub/b.txt": "鸟".encode(),
        "c.png": png(3),
        "d.jpg": jpeg(4),
        "d.txt": b"  \n\n",
        "e.png": png(5),
        "e.txt": b"\xff\xfe",
        "f.jpg": truncated_jpeg(6),
        "f.txt": "截断".encode(),
        "g.bmp": encode(make_image(7), "BMP"),
        "g.txt": b"bmp picture\r\n",
        "x.PNG": png(8),
        "x.txt": b"upper-case suffix",
        ".hidden/h.png": png(9),
        ".hidden/h.txt": b"hidden",
        "notes.txt": b"a caption file without image: missing_image",
        "sub/y.txt": b"no y.png beside it",
        "sub/b.png.txt": b"stem b.png: no image either",
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root


def test_folder_records_and_iteration(folder):
    log = SkipLog()
    recs = ImageFolder(folder).records(log)
    assert [(r.key, r.captions) for r in recs] == [
        ("a", ["猫", "狗"]),
        ("f", ["截断"]),
        ("g", ["bmp picture"]),
        ("sub/b", ["鸟"]),
        ("x", ["upper-case suffix"]),
    ]
    assert recs[0].where == str(folder / "a.png") and recs[0].ref == folder / "a.png"
    assert dict(log.by_reason) == {"missing_caption": 1, "empty_caption": 1, "bad_utf8": 1, "missing_image": 3}
    assert log.examples["missing_caption"] == [str(folder / "c.png")]
    assert log.examples["missing_image"] == [str(folder / p) for p in ("notes.txt", "sub/b.png.txt", "sub/y.txt")]
    assert log.examples["empty_caption"] == [str(folder / "d.txt")]
    assert log.examples["bad_utf8"] == [str(folder / "e.txt")]

    got, log = run(ImageFolder(folder))
    assert list(got) == ["a", "g", "sub/b", "x"]
    assert log.n_bad == 7  # the 6 above and f.jpg
    assert same_pixels(got["a"][0], make_image(1)) and same_pixels(got["g"][0], make_image(7))
    assert log.n_ok == 4 and log.examples["bad_image"] == [str(folder / "f.jpg")]


def test_folder_same_stem_images_get_distinct_keys(tmp_path):
    (tmp_path / "p.png").write_bytes(png(1))
    (tmp_path / "p.jpg").write_bytes(jpeg(1))
    (tmp_path / "p.txt").write_text("共用的说明")
    recs = ImageFolder(tmp_path).records(SkipLog())
    assert [r.key for r in recs] == ["p.jpg", "p.png"]


def test_rgba_is_composited_on_white(tmp_path):
    im = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    im.putpixel((0, 0), (0, 0, 255, 255))
    (tmp_path / "t.png").write_bytes(encode(im))
    (tmp_path / "t.txt").write_text("透明")
    (_, image, _), *_ = list(ImageFolder(tmp_path))
    assert (
        image.mode == "RGB" and image.getpixel((0, 0)) == (0, 0, 255) and image.getpixel((1, 1)) == (255,) * 3
    )


# -- webdataset shards ----------------------------------------------------------------------


@pytest.fixture
def shards(tmp_path):
    d = tmp_path / "wds"
    a = write_tar(
        d / "000.tar",
        {
            "k1.jpg": jpeg(1),
            "k1.txt": "第一句\n 第二句 \n",
            "k1.json": "{}",
            "k2.png": png(2),
            "k2.txt": "二",
            "k3.txt": "只有文字",
            "k4.jpg": jpeg(4),
        },
    )
    b = write_tar(
        d / "001.tar",
        {
            "k5.jpg": jpeg(5),
            "k5.txt": "  \n",
            "k6.png": png(6),
            "k6.txt": b"\xff\xfe",
            "k7.jpg": truncated_jpeg(7),
            "k7.txt": "截断",
            "dir/k8.JPEG": jpeg(8),
            "dir/k8.txt": "子目录",
            "k9.seg.png": png(90),
            "k9.png": png(9),
            "k9.txt": "九",
        },
    )
    return d, a, b


def test_wds_records_and_iteration(shards):
    d, a, b = shards
    log = SkipLog()
    recs = WebDataset(str(d / "{000..001}.tar")).records(log)
    assert [(r.key, r.captions, r.where) for r in recs] == [
        ("k1", ["第一句", "第二句"], f"{a}:k1"),
        ("k2", ["二"], f"{a}:k2"),
        ("k7", ["截断"], f"{b}:k7"),
        ("dir/k8", ["子目录"], f"{b}:dir/k8"),
        ("k9", ["九"], f"{b}:k9"),
    ]
    assert recs[0].ref[0] == a and len(recs[0].ref) == 3
    assert dict(log.by_reason) == {
        "missing_image": 1,
        "missing_caption": 1,
        "empty_caption": 1,
        "bad_utf8": 1,
    }
    assert log.examples["missing_image"] == [f"{a}:k3"]
    assert log.examples["missing_caption"] == [f"{a}:k4"]
    assert log.examples["empty_caption"] == [f"{b}:k5"]
    assert log.examples["bad_utf8"] == [f"{b}:k6"]

    got, log = run(WebDataset([a, b]))
    assert list(got) == ["k1", "k2", "dir/k8", "k9"]
    assert same_pixels(got["k2"][0], make_image(2)) and same_pixels(got["k9"][0], make_image(9))
    assert log.n_ok == 4 and log.examples["bad_image"] == [f"{b}:k7"]


def test_wds_url_forms_and_errors(shards, tmp_path):
    d, a, b = shards
    assert WebDataset(str(d / "*.tar")).paths == [a, b]
    assert WebDataset(d).paths == [a, b]
    assert WebDataset(a).paths == [a]
    with pytest.raises(DataError) as e:
        WebDataset(str(d / "{000..002}.tar"), key="data.train")
    assert "data.train=" in str(e.value) and "002.tar" in str(e.value)
    with pytest.raises(DataError) as e:
        WebDataset(str(d / "x*.tar"))
    assert "no file matches" in str(e.value)
    gz = tmp_path / "c.tar.gz"
    gz.write_bytes(gzip.compress(a.read_bytes()))
    with pytest.raises(DataError) as e:
        WebDataset(gz).records(SkipLog())
    assert "not a readable uncompressed tar" in str(e.value) and str(gz) in str(e.value)


def test_duplicate_is_a_reason():
    assert "duplicate" in REASONS
    log = SkipLog()
    log.skip("duplicate", "f.tsv:3")
    assert log.summary().endswith("duplicate: 1 (e.g. f.tsv:3)")


def test_split_member():
    assert split_member("dir/abc.seg.PNG") == ("dir/abc", "seg.png")
    assert split_member("abc.jpg") == ("abc", "jpg")


def test_decode_wds_sample():
    key, image, caps = decode_wds_sample(
        {"__key__": "k", "__url__": "s.tar", "png": png(1), "txt": b" a \nb\n"}
    )
    assert key == "k" and caps == ["a", "b"] and same_pixels(image, make_image(1))
    _, _, caps = decode_wds_sample({"__key__": "k", "jpg": jpeg(1), "txt": "已解码"}, "w")
    assert caps == ["已解码"]
    cases = [
        ({"__key__": "k", "__url__": "s.tar", "txt": b"x"}, "missing_image"),
        ({"__key__": "k", "__url__": "s.tar", "jpg": jpeg(1)}, "missing_caption"),
        ({"__key__": "k", "__url__": "s.tar", "jpg": jpeg(1), "txt": b"\xff"}, "bad_utf8"),
        ({"__key__": "k", "__url__": "s.tar", "jpg": jpeg(1), "txt": b" "}, "empty_caption"),
        ({"__key__": "k", "__url__": "s.tar", "jpg": truncated_jpeg(1), "txt": b"x"}, "bad_image"),
    ]
    for sample, reason in cases:
        with pytest.raises(BadSample) as e:
            decode_wds_sample(sample)
        assert (e.value.reason, e.value.where) == (reason, "s.tar:k")


# -- factory --------------------------------------------------------------------------------


def test_open_source(folder, easynlp):
    assert set(SOURCES) == {"easynlp_tsv", "easynlp_knowledge_tsv", "muge", "coco_cn", "folder", "wds",
                            "muge_caption"}
    assert isinstance(open_source("folder", root=folder), ImageFolder)
    src = open_source("easynlp_tsv", easynlp, key="data.train")
    assert isinstance(src, EasyNLPTSV) and src.path == Path(easynlp)
    with pytest.raises(DataError) as e:
        open_source("csv", path="x")
    assert "'csv'" in str(e.value) and "easynlp_tsv, muge, coco_cn, folder, wds" in str(e.value)
    with pytest.raises(DataError) as e:
        open_source("muge", path=folder)
    assert "'muge'" in str(e.value) and "root" in str(e.value)


def test_wds_cut_off_shard(shards):
    _, a, _ = shards
    data = a.read_bytes()
    cut = a.with_name("cut.tar")
    cut.write_bytes(data[: 512 + 512 * ((len(jpeg(1)) + 511) // 512) + 100])  # k1.jpg, then half a header
    with pytest.raises(DataError, match=f"input: shard {cut} is cut off after byte"):
        WebDataset(cut).records(SkipLog())
    assert check_tar(cut).startswith("is truncated")
    assert check_tar(a) is None
    bad = bytearray(data)
    second = 512 + 512 * ((len(jpeg(1)) + 511) // 512)  # header of the member after k1.jpg
    bad[second : second + 100] = b"\x07" * 100
    cut.write_bytes(bytes(bad))
    assert check_tar(cut) == f"has a corrupt tar header at byte {second}: the samples after it cannot be read"
    with pytest.raises(DataError, match="corrupt tar header"):
        WebDataset(cut).records(SkipLog())
