"""Shard conversion: round trip through the WebDataset reader, keys, json, bad-row limit, overwrite."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from t2i.data.formats import EasyNLPTSV, ImageFolder
from t2i.data.shards import ShardWriter, convert, sanitize_key
from t2i.data.skips import DataError
from t2i.data.wds import WebDataset, decode_wds_sample
from tests.fixtures import b64, encode, jpeg, make_image, png, same_pixels, truncated_jpeg, write_lines


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    files = {
        "a.png": png(1),
        "a.txt": "猫\n狗\n",
        "b.jpg": jpeg(2),
        "b.txt": "鸟",
        "c.bmp": encode(make_image(3), "BMP"),
        "c.txt": "位图",
        "sub/d.png": png(4),
        "sub/d.txt": "子目录",
        "e.png": png(5),  # no caption
        "f.jpg": truncated_jpeg(6),
        "f.txt": "截断",
    }
    for name, data in files.items():
        (root / name).write_bytes(data.encode() if isinstance(data, str) else data)
    return root


def test_round_trip(folder, tmp_path, capsys):
    out = tmp_path / "shards"
    summary = convert(ImageFolder(folder), out, shard_size=2, progress=False, max_bad_fraction=0.5)
    assert summary["written"] == 4
    assert summary["skipped"] == {"missing_caption": 1, "bad_image": 1}
    assert summary["shards"] == [str(out / "shard-000000.tar"), str(out / "shard-000001.tar")]
    assert summary["log"].n_ok == 4
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.tar", "shard-000001.tar"]
    printed = capsys.readouterr().out
    assert "folder: 4 ok, 2 skipped (33.33%)" in printed and "wrote 4 samples to 2 shard(s)" in printed

    with tarfile.open(out / "shard-000000.tar") as tar:
        assert tar.getnames() == ["a.png", "a.txt", "a.json", "b.jpg", "b.txt", "b.json"]
        assert tar.extractfile("b.jpg").read() == jpeg(2)  # JPEG/PNG bytes are kept as they are
        meta = json.loads(tar.extractfile("a.json").read())
    assert meta == {
        "key": "a",
        "captions": ["猫", "狗"],
        "width": 12,
        "height": 8,
        "source_where": str(folder / "a.png"),
        "source_key": "a",
    }

    src = WebDataset(out)
    got = {key: (image, caps) for key, image, caps in src}
    assert list(got) == ["a", "b", "c", "sub_d"]
    assert got["a"][1] == ["猫", "狗"] and got["sub_d"][1] == ["子目录"]
    assert same_pixels(got["a"][0], make_image(1)) and same_pixels(got["sub_d"][0], make_image(4))
    original_b = next(im for k, im, _ in ImageFolder(folder) if k == "b")
    assert same_pixels(got["b"][0], original_b)
    assert got["c"][0].size == (12, 8)  # BMP is re-encoded as JPEG
    assert src.log.n_ok == 4 and src.log.n_bad == 0

    # the webdataset library reads the shards too
    samples = list(wds.WebDataset(summary["shards"], shardshuffle=False))
    decoded = [decode_wds_sample(s) for s in samples]
    assert [k for k, _, _ in decoded] == ["a", "b", "c", "sub_d"]
    assert [s.keys() >= {"json", "txt"} for s in samples] == [True] * 4


def test_reencode_and_quality(folder, tmp_path):
    out = tmp_path / "re"
    convert(ImageFolder(folder), out, progress=False, max_bad_fraction=1, reencode=True, quality=80)
    with tarfile.open(out / "shard-000000.tar") as tar:
        names = tar.getnames()
    assert [n for n in names if not n.endswith((".txt", ".json"))] == ["a.jpg", "b.jpg", "c.jpg", "sub_d.jpg"]


def test_keys_are_sanitised_and_unique(tmp_path):
    path = write_lines(
        tmp_path / "k.tsv",
        [
            f"a.b\t一\t{b64(png(1))}",
            f"a_b\t二\t{b64(png(2))}",
            f"a/b\t三\t{b64(png(3))}",
            f"c\t四\t{b64(png(4))}",
        ],
    )
    out = tmp_path / "out"
    convert(EasyNLPTSV(path), out, progress=False)
    got = [(k, caps) for k, _, caps in WebDataset(out)]
    assert got == [("a_b", ["一"]), ("a_b_1", ["二"]), ("a_b_2", ["三"]), ("c", ["四"])]
    assert sanitize_key("x.y/z\\w") == "x_y_z_w"


def test_too_many_bad_rows_raises_and_leaves_nothing(tmp_path, capsys):
    path = write_lines(
        tmp_path / "bad.tsv",
        [f"1\t好\t{b64(png(1))}", "2\t坏\t###", f"3\t截断\t{b64(truncated_jpeg(3))}", "4\tno image"],
    )
    out = tmp_path / "out"
    with pytest.raises(DataError) as e:
        convert(EasyNLPTSV(path), out, progress=False, max_bad_fraction=0.5)
    assert f"worst file: {path} (3 bad)" in str(e.value)
    assert (
        "bad_base64=1" in str(e.value) and "bad_image=1" in str(e.value) and "bad_columns=1" in str(e.value)
    )
    assert "easynlp_tsv: 1 ok, 3 skipped (75.00%)" in capsys.readouterr().out
    assert not out.exists() and not list(tmp_path.glob(".out.*"))  # no shards, no staging folder left

    # overwrite=true: a failed run keeps the old shards; a good one replaces them whole
    good = write_lines(tmp_path / "good.tsv", [f"{i}\t好\t{b64(png(i))}" for i in range(3)])
    convert(EasyNLPTSV(good), out, shard_size=1, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    with pytest.raises(DataError, match="samples were bad"):
        convert(EasyNLPTSV(path), out, progress=False, max_bad_fraction=0.5, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    convert(EasyNLPTSV(path), out, progress=False, max_bad_fraction=0.8, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["shard-000000.tar"] and [k for k, _, _ in WebDataset(out)] == ["1"]

    summary = convert(EasyNLPTSV(path), tmp_path / "out2", progress=False, max_bad_fraction=0.8)
    assert summary["written"] == 1
    assert summary["skipped"] == {"bad_base64": 1, "bad_image": 1, "bad_columns": 1}


def test_existing_shards_need_overwrite(folder, tmp_path):
    out = tmp_path / "out"
    src = ImageFolder(folder)
    assert len(convert(src, out, shard_size=1, progress=False, max_bad_fraction=1)["shards"]) == 4
    (out / "keep-000000.tar").write_bytes(b"")  # another prefix is left alone
    with pytest.raises(DataError) as e:
        convert(src, out, progress=False, max_bad_fraction=1)
    assert "overwrite=True" in str(e.value) and "4 shard(s)" in str(e.value)
    summary = convert(src, out, shard_size=10, progress=True, max_bad_fraction=1, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["keep-000000.tar", "shard-000000.tar"]
    assert summary["written"] == 4


def test_writer_direct(tmp_path):
    with pytest.raises(DataError):
        ShardWriter(tmp_path, shard_size=0)
    with ShardWriter(tmp_path / "w", prefix="x", shard_size=2) as w:
        for i in range(5):
            w.write(f"k{i}", make_image(i), [f"c{i}"], f"src:{i}")
    assert [p.name for p in w.shards] == ["x-000000.tar", "x-000001.tar", "x-000002.tar"]
    assert [k for k, _, _ in WebDataset(tmp_path / "w")] == [f"k{i}" for i in range(5)]
    assert not list((tmp_path / "w").glob("*.tmp"))


def test_resharding_in_place_is_refused_before_anything_is_touched(folder, tmp_path):
    out = tmp_path / "out"
    convert(ImageFolder(folder), out, shard_size=2, progress=False, max_bad_fraction=1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["shard-000000.tar", "shard-000001.tar"]
    for overwrite in (True, False):
        with pytest.raises(DataError) as e:
            convert(WebDataset(out), out, shard_size=10, progress=False, overwrite=overwrite)
        msg = str(e.value)
        assert f"output={out} holds the input shards ({out / 'shard-000000.tar'} and 1 more)" in msg
        assert "write to another folder" in msg
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # input intact, nothing new
    # one input shard among several, given by path and through a symlinked folder: refused too
    link = tmp_path / "link"
    link.symlink_to(out)
    with pytest.raises(DataError, match="holds the input shards"):
        convert(WebDataset(out / "shard-000001.tar"), link, progress=False, overwrite=True)
    # an input TSV named like a shard counts as well
    tsv = tmp_path / "t" / "shard-000000.tar"
    write_lines(tsv, [f"1\t一\t{b64(png(1))}"])
    with pytest.raises(DataError, match="holds the input shards"):
        convert(EasyNLPTSV(tsv), tsv.parent, progress=False, overwrite=True)
    # another prefix in the same folder, or another folder, is fine
    summary = convert(WebDataset(out), out, prefix="re", shard_size=10, progress=False)
    assert summary["written"] == 4 and (out / "re-000000.tar").is_file()
    assert convert(WebDataset(out / "shard-*.tar"), tmp_path / "other", progress=False)["written"] == 4


def test_empty_input_and_all_bad_input_fail_and_write_nothing(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as e:
        convert(ImageFolder(empty), tmp_path / "out", progress=False)
    assert str(e.value) == (f"input={empty}: no samples found for source=folder; check the path and the source "
                            f"reader (nothing was written)")
    bad = write_lines(tmp_path / "bad.tsv", ["1\t坏\t###", "2\t坏\t###"])
    with pytest.raises(DataError, match=f"input={bad}: all 2 samples were skipped"):
        convert(EasyNLPTSV(bad), tmp_path / "out", progress=False, max_bad_fraction=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tsv", "empty"]


def test_output_that_is_a_file_is_a_clear_error(folder, tmp_path):
    f = tmp_path / "shards.tar"
    f.write_bytes(b"x")
    for output in (f, f / "sub"):
        with pytest.raises(DataError, match=f"output={output}: {f} is a file; give a folder for the shards"):
            convert(ImageFolder(folder), output, progress=False, max_bad_fraction=1)
    assert f.read_bytes() == b"x"


def test_duplicate_ids_are_skipped_with_their_location(tmp_path, capsys):
    """The same id twice (here across two webdataset shards) keeps the first sample; the rest count as skipped."""
    a, b = tmp_path / "a", tmp_path / "b"
    with ShardWriter(a, prefix="x") as w:
        w.write("k1", make_image(1), ["一"])
        w.write("k2", make_image(2), ["二"])
    with ShardWriter(b, prefix="y") as w:
        w.write("k2", make_image(3), ["三"])
        w.write("k3", make_image(4), ["四"])
    out = tmp_path / "out"
    summary = convert(WebDataset([a / "x-000000.tar", b / "y-000000.tar"]), out, progress=False,
                      max_bad_fraction=0.5)
    assert summary["written"] == 3 and summary["skipped"] == {"duplicate": 1}
    got = {k: caps for k, _, caps in WebDataset(out)}
    assert got == {"k1": ["一"], "k2": ["二"], "k3": ["四"]}
    printed = capsys.readouterr().out
    assert "3 ok, 1 skipped (25.00%)" in printed and f"duplicate: 1 (e.g. {b / 'y-000000.tar'}:k2)" in printed
    # an EasyNLP TSV with a repeated idx: the first line is kept, the later one is reported by line
    tsv = write_lines(tmp_path / "d.tsv", [f"1\t一\t{b64(png(1))}", f"2\t二\t{b64(png(2))}",
                                           f"1\t重复\t{b64(png(3))}"])
    summary = convert(EasyNLPTSV(tsv), tmp_path / "out2", progress=False, max_bad_fraction=0.5)
    assert summary["written"] == 2 and summary["log"].examples["duplicate"] == [f"{tsv}:3"]


def test_convert_into_a_new_folder_is_one_rename(folder, tmp_path, monkeypatch):
    """Into a missing (or empty) output the staging folder is renamed in one step: no shard moves alone."""
    import os

    import t2i.data.shards as shards

    moves = []

    def spy(real):
        def move(a, b):
            if ".converting-" not in str(b):  # out of the staging folder (the writer's .tmp -> .tar stay in it)
                moves.append((Path(a).name, Path(b).name))
            return real(a, b)
        return move

    monkeypatch.setattr(shards.os, "replace", spy(os.replace))
    monkeypatch.setattr(shards.os, "rename", spy(os.rename))
    out = tmp_path / "new"
    convert(ImageFolder(folder), out, shard_size=1, progress=False, max_bad_fraction=1)
    assert moves == [(f".new.converting-{os.getpid()}", "new")] and len(list(out.glob("shard-*.tar"))) == 4
    (tmp_path / "empty").mkdir()
    convert(ImageFolder(folder), tmp_path / "empty", shard_size=1, progress=False, max_bad_fraction=1)
    assert moves[1:] == [(f".empty.converting-{os.getpid()}", "empty")]
    assert len(list((tmp_path / "empty").glob("shard-*.tar"))) == 4
    assert not list(tmp_path.glob(".*.converting-*"))


def test_a_kill_while_moving_shards_in_leaves_a_set_readers_refuse(folder, tmp_path, monkeypatch):
    """Into a folder that holds other files the shards move one by one under a marker; killed midway, every
    reader refuses the folder and a rerun needs overwrite=true, which completes it."""
    import os

    import t2i.data.shards as shards
    from t2i.data.wds import expand_urls

    out = tmp_path / "out"
    out.mkdir()
    (out / "README.txt").write_text("mine")
    real, calls = os.replace, []

    def killed(a, b):
        if ".converting-" in str(b):  # the writer finishing a shard in the staging folder
            return real(a, b)
        calls.append(b)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the kill, after two whole shards moved in
        real(a, b)

    monkeypatch.setattr(shards.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        convert(ImageFolder(folder), out, shard_size=1, progress=False, max_bad_fraction=1)
    monkeypatch.setattr(shards.os, "replace", real)
    assert len(list(out.glob("shard-*.tar"))) == 2 and (out / ".t2i-incomplete").is_file()
    with pytest.raises(DataError, match=r"input=.*out: its shards are an incomplete set .*overwrite=true"):
        expand_urls(str(out))
    with pytest.raises(DataError, match=r"input=.*incomplete set"):
        expand_urls(str(out / "shard-*.tar"))
    with pytest.raises(DataError, match=r"holds an incomplete set of shards .*pass overwrite=true"):
        convert(ImageFolder(folder), out, shard_size=1, progress=False, max_bad_fraction=1)
    convert(ImageFolder(folder), out, shard_size=1, progress=False, max_bad_fraction=1, overwrite=True)
    assert len(expand_urls(str(out))) == 4 and not (out / ".t2i-incomplete").exists()
    assert (out / "README.txt").read_text() == "mine"


def test_stale_staging_folders_of_dead_runs_are_removed(folder, tmp_path, capsys):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    out = tmp_path / "out"
    stale = tmp_path / f".out.converting-{pid}"
    stale.mkdir()
    (stale / "shard-000000.tar.tmp").write_bytes(b"half")
    import os

    live = tmp_path / f".out.converting-{os.getppid()}"  # a running process's folder is left alone
    live.mkdir()
    convert(ImageFolder(folder), out, progress=False, max_bad_fraction=1)
    assert not stale.exists() and live.is_dir()
    assert f"removed {stale}: the staging folder of an earlier run (pid {pid}) that did not finish" in \
        capsys.readouterr().out
