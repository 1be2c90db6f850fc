"""t2i-tokenize with a tiny real tokenizer (tests/toy_tokenizer.py): code shards, manifest, resume, ranks, errors."""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module

from t2i.cli.tokenize import run
from t2i.data.codes import CodeShards, check_manifest, file_sha256, load_codes, read_manifest
from t2i.data.formats import EasyNLPTSV
from t2i.data.skips import DataError, SkipLog
from t2i.data.transforms import ImageTransform, from_raw
from tests.fixtures import b64, png, write_lines
from tests.toy_tokenizer import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ["data.shapes.n_train=40", "data.shapes.n_val=8", "data.shapes.n_test=8", "data.shapes.n_compositional=4",
          "data.image_size=16"]


def tok_cfg(tmp_path, *overrides):
    with initialize_config_module("t2i.conf", version_base="1.3"):
        return compose("tokenize", overrides=[f"paths.data_dir={tmp_path}/data", f"paths.log_dir={tmp_path}/logs",
                                              "progress=false", "num_workers=0", "batch_size=8", *overrides])


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "tok.ckpt"
    save_checkpoint(path, downsample=4, levels=4)
    return path


def tokenize(tmp_path, ckpt, *overrides, output="codes"):
    return run(tok_cfg(tmp_path, f"tokenizer_ckpt={ckpt}", f"output={tmp_path / output}", *SHAPES, *overrides))


def shapes_images(tmp_path, split):
    """(records, float images [N, 3, 16, 16]) of a Shapes split, loaded the way training loads them."""
    src = EasyNLPTSV(tmp_path / "data" / "shapes_16_zh" / f"shapes_{split}.tsv")
    recs = src.records(SkipLog())
    tf = ImageTransform(16, raw=True)
    return recs, from_raw(torch.stack([tf(src.load(r)) for r in recs]))


def test_round_trip_and_manifest(tmp_path, ckpt, capsys):
    summary = tokenize(tmp_path, ckpt, "shard_size=16")
    out = tmp_path / "codes"
    assert summary["splits"]["train"]["shards"] == 3 and summary["images_per_s"] > 0
    line = capsys.readouterr().out
    assert "tokenized 56 images in" in line and "images/s (encoder alone" in line
    manifest = read_manifest(out)
    assert manifest["count"] == {"train": 40, "val": 8, "test": 8}
    assert manifest["shards"]["train"] == [f"codes-train-00-00000{i}.tar" for i in range(3)]
    assert manifest["grid"] == [4, 4] and manifest["codebook_size"] == 64 and manifest["downsample"] == 4
    assert manifest["image_size"] == 16 and manifest["dtype"] == "int16" and manifest["version"] == 1
    assert manifest["tokenizer_ckpt"] == str(ckpt) and manifest["tokenizer_sha256"] == file_sha256(ckpt)
    assert manifest["data"]["source"] == "easynlp_tsv" and manifest["data"]["image_size"] == 16
    assert "${" not in json.dumps(manifest["data"])
    assert manifest["splits"]["train"] == {"world_size": 1, "shard_size": 16, "records": 40, "skipped": {}}

    from t2i.pretrained.image_tokenizers import load_tokenizer

    tok = load_tokenizer(ckpt)
    for split in ("train", "test"):
        recs, images = shapes_images(tmp_path, split)
        keys, codes, captions = load_codes(out, split)
        assert keys == [r.key for r in recs] and captions == [r.captions for r in recs]
        assert codes.dtype == torch.long and codes.shape == (len(recs), 4, 4)
        assert torch.equal(tok.decode(codes), tok.decode(tok.encode(images)))  # decodes to its own reconstruction
        assert torch.equal(codes, tok.encode(images))
    # the members: int16 .npy grid, captions one a line, json
    with tarfile.open(out / "codes-val-00-000000.tar") as tar:
        names = tar.getnames()
        key = names[0].split(".")[0]
        assert names[:3] == [f"{key}.codes.npy", f"{key}.txt", f"{key}.json"]
        arr = np.load(io.BytesIO(tar.extractfile(names[0]).read()))
        meta = json.loads(tar.extractfile(names[2]).read())
    assert arr.dtype == np.int16 and arr.shape == (4, 4)
    assert set(meta) == {"key", "captions", "source_where"} and meta["source_where"].endswith("shapes_val.tsv:1")
    assert len(CodeShards(out, "val")) == 8


def write_muge(root: Path, bad_image: bool = False) -> Path:
    write_lines(root / "T2I_train.text.tsv", ["a\t红色连衣裙", "b\t蓝色鞋子", "a\t一条红色的裙子", "c\t绿色帽子"])
    imgs = ["a\t" + b64(png(1, (20, 24))), "b\t" + b64(png(2, (24, 20))),
            "c\t" + ("not*base64" if bad_image else b64(png(3, (16, 16))))]
    write_lines(root / "T2I_train.img.tsv", imgs)
    return root


def muge_args(root):
    return ["data=muge", f"data.train={{root: '{root}', split: train}}", "data.val=null", "data.image_size=16",
            "data.num_workers=0"]


def test_one_record_per_image_with_all_captions_and_skips(tmp_path, ckpt, capsys):
    root = write_muge(tmp_path / "muge", bad_image=True)
    base = [f"tokenizer_ckpt={ckpt}", f"output={tmp_path / 'codes'}", *muge_args(root)]
    with pytest.raises(DataError, match=r"1 of 3 samples were bad .*worst file: .*T2I_train.img.tsv"):
        run(tok_cfg(tmp_path, *base))
    assert not (tmp_path / "codes" / "manifest.json").exists()  # a split past max_bad_fraction is not published
    assert "bad_base64: 1" in capsys.readouterr().out
    summary = run(tok_cfg(tmp_path, *base, "data.max_bad_fraction=0.5"))
    assert summary["splits"]["train"]["resumed"] == 1 and summary["splits"]["train"]["encoded"] == 0
    keys, codes, captions = load_codes(tmp_path / "codes", "train")
    assert keys == ["a", "b"] and captions == [["红色连衣裙", "一条红色的裙子"], ["蓝色鞋子"]]
    manifest = read_manifest(tmp_path / "codes")
    assert manifest["count"] == {"train": 2} and manifest["splits"]["train"]["skipped"] == {"bad_base64": 1}
    with tarfile.open(tmp_path / "codes" / "codes-train-00-000000.tar") as tar:
        assert tar.extractfile("a.txt").read().decode() == "红色连衣裙\n一条红色的裙子"


def test_resume_rewrites_only_missing_shards(tmp_path, ckpt):
    tokenize(tmp_path, ckpt, "shard_size=16", "split=train")
    out = tmp_path / "codes"
    shards = sorted(out.glob("codes-train-*.tar"))
    assert len(shards) == 3
    before = {p.name: p.stat().st_mtime_ns for p in shards}
    data_before = {p.name: p.read_bytes() for p in shards}
    shards[-1].unlink()
    summary = tokenize(tmp_path, ckpt, "shard_size=16", "split=train")
    r = summary["splits"]["train"]
    assert r["resumed"] == 2 and r["encoded"] == 8 and r["count"] == 40
    after = {p.name: p.stat().st_mtime_ns for p in sorted(out.glob("codes-train-*.tar"))}
    assert after.keys() == before.keys()
    assert {k: after[k] for k in list(after)[:2]} == {k: before[k] for k in list(before)[:2]}
    assert shards[-1].read_bytes() == data_before[shards[-1].name]  # the same bytes again
    assert read_manifest(out)["count"] == {"train": 40}
    again = tokenize(tmp_path, ckpt, "shard_size=16", "split=train")["splits"]["train"]
    assert again["encoded"] == 0 and again["resumed"] == 3
    # another split into the same folder adds to the manifest
    tokenize(tmp_path, ckpt, "shard_size=16", "split=val")
    assert read_manifest(out)["count"] == {"train": 40, "val": 8}
    with pytest.raises(DataError, match="written with shard_size=16 .*this run has shard_size=10"):
        tokenize(tmp_path, ckpt, "shard_size=10", "split=train")


def test_two_ranks_cover_all_records_disjointly(tmp_path, ckpt, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("RANK", "0")
    first = tokenize(tmp_path, ckpt, "shard_size=8", "split=train", "num_workers=2")
    assert first["manifest"] is None  # rank 1 has not run yet
    with pytest.raises(DataError, match="no manifest.json"):
        read_manifest(tmp_path / "codes")
    monkeypatch.setenv("RANK", "1")
    second = tokenize(tmp_path, ckpt, "shard_size=8", "split=train")
    assert second["manifest"]["count"] == {"train": 40}
    out = tmp_path / "codes"
    per_rank = {r: [k for p in sorted(out.glob(f"codes-train-{r:02d}-*.tar")) for k, _, _ in CodeShards(p)]
                for r in (0, 1)}
    recs, _ = shapes_images(tmp_path, "train")
    assert per_rank[0] == [r.key for r in recs[0::2]] and per_rank[1] == [r.key for r in recs[1::2]]
    assert sorted(out.glob("codes-train-00-*.tar"))[-1].name == "codes-train-00-000002.tar"  # 20 = 8 + 8 + 4
    keys, codes, _ = load_codes(out, "train")
    assert sorted(keys) == sorted(r.key for r in recs) and len(set(keys)) == 40
    assert read_manifest(out)["splits"]["train"]["world_size"] == 2
    # sharded readers: two DDP ranks of the reader see every sample once
    seen = [k for rank in (0, 1) for k, _, _ in CodeShards(out, "train", rank=rank, world_size=2)]
    assert sorted(seen) == sorted(keys)


def test_other_tokenizer_needs_overwrite_and_int32_codes(tmp_path, ckpt):
    tokenize(tmp_path, ckpt, "split=val")
    big = tmp_path / "big.ckpt"
    tok = save_checkpoint(big, downsample=4, levels=33)  # 35937 codes: more than int16 holds
    with pytest.raises(DataError, match=r"holds code shards from another image tokenizer \(manifest\.rank0\.json: "
                                        r"a 4x4 grid of 64 codes .*overwrite=true"):
        tokenize(tmp_path, big, "split=val")
    tokenize(tmp_path, big, "split=val", "overwrite=true")
    manifest = read_manifest(tmp_path / "codes")
    assert manifest["dtype"] == "int32" and manifest["codebook_size"] == 35937
    _, images = shapes_images(tmp_path, "val")
    _, codes, _ = load_codes(tmp_path / "codes", "val")
    assert int(codes.max()) > 32767 and torch.equal(codes, tok.encode(images))  # white: the last palette entry


def test_check_manifest_message(tmp_path):
    manifest = {"grid": [8, 8], "codebook_size": 512, "path": "data/codes/x"}
    check_manifest(manifest, 8, 512)
    check_manifest(manifest, (8, 8), 512)
    with pytest.raises(DataError) as e:
        check_manifest(manifest, 16, 1024)
    assert str(e.value) == ("code shards in data/codes/x have a 8x8 grid of 512 codes; the transformer is configured "
                            "for 16x16 / 1024: set model.image_grid=8 model.codebook_size=512 or re-tokenize with "
                            "the matching image tokenizer")
    with pytest.raises(DataError, match="no 'test' split \\(have: train\\)"):
        (tmp_path / "c").mkdir()
        (tmp_path / "c" / "manifest.json").write_text(json.dumps({"version": 1, "shards": {"train": []},
                                                                  "count": {"train": 0}}))
        CodeShards(tmp_path / "c", "test")


def cli(tmp_path, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "T2I_OUTPUTS": str(tmp_path / "logs"),
           "T2I_DATA": str(tmp_path / "data")}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "t2i.cli.tokenize", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_errors_are_one_line(tmp_path, ckpt):
    res = cli(tmp_path, f"tokenizer_ckpt={ckpt}", f"output={tmp_path}/codes", "data.image_size=30")
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines() == [
        "error: data.image_size=30 is not divisible by the tokenizer's downsampling factor 4 "
        "(use e.g. data.image_size=32 or 28)"]
    assert not (tmp_path / "data").exists()  # checked before any data is built
    res = cli(tmp_path, f"tokenizer_ckpt={tmp_path}/nope.ckpt", "output=codes")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert f"error: tokenizer_ckpt={tmp_path}/nope.ckpt: no such file" in res.stderr
