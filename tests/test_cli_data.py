"""t2i-data commands: shapes -> tokenizer -> convert -> inspect, and their error messages."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from PIL import Image

from t2i.cli.data import run
from t2i.data.formats import open_source
from t2i.data.oracle import score
from t2i.data.shapes import ShapeSpec
from t2i.data.skips import SkipLog
from t2i.data.tokenizer import TextTokenizer


def data_cfg(tmp_path, *overrides):
    with initialize_config_module("t2i.conf", version_base="1.3"):
        return compose("data", overrides=[f"paths.log_dir={tmp_path}/logs", "progress=false", *overrides])


def test_shapes_tokenizer_convert_inspect_chain(tmp_path, capsys):
    sh, shards = tmp_path / "sh", tmp_path / "shards"
    made = run(data_cfg(tmp_path, "command=shapes", f"output={sh}", "n_train=40", "n_val=8", "n_test=8",
                 "n_compositional=8", "image_size=32", "lang=en"))
    assert len((sh / "shapes_train.tsv").read_text().splitlines()) == 40
    assert made["oracle_test"]["all"] == 1.0 and made["oracle_test"]["n"] == 8
    meta = json.loads((sh / "meta.json").read_text())
    assert meta["lang"] == "en" and meta["image_size"] == 32

    out = run(data_cfg(tmp_path, "command=tokenizer", f"input={sh}/shapes_train.tsv", f"output={sh}/tok.json",
                       "vocab_size=200"))
    tok = TextTokenizer.from_file(sh / "tok.json")
    assert out["tokenizer"].fingerprint == tok.fingerprint
    assert tok.decode(tok.encode("a large red circle in the top left", 12)[0]) == "a large red circle in the top left"

    summary = run(data_cfg(tmp_path, "command=convert", f"input={sh}/shapes_train.tsv", f"output={shards}",
                           "shard_size=16"))
    assert summary["written"] == 40 and len(summary["shards"]) == 3
    # the shards hold the same images: the oracle reads the specs of the jsonl sidecar back from them
    specs = {}
    for line in (sh / "shapes_train.jsonl").read_text().splitlines():
        row = json.loads(line)
        specs[row["key"]] = ShapeSpec.from_dict(row["spec"])
    src = open_source("wds", str(shards / "*.tar"))
    recs = src.records(SkipLog())
    result = score([src.load(r) for r in recs], [specs[r.key] for r in recs])
    assert result["all"] == 1.0 and result["n"] == 40

    capsys.readouterr()
    stats = run(data_cfg(tmp_path, "command=inspect", "source=wds", f"input={shards}/*.tar",
                         f"tokenizer={sh}/tok.json", "text_len=4", f"output={tmp_path}/insp", "n_preview=10"))
    assert stats["images"] == 40 and stats["captions"] == 40
    assert stats["truncated_at_text_len_4"] == 40 and stats["skipped_while_indexing"] == {}
    assert Image.open(stats["preview"]).size == (8 * 66 - 2, 2 * 66 - 2)  # 64 px tiles, 2 px gaps
    assert len((tmp_path / "insp" / "captions.txt").read_text().splitlines()) == 10
    assert "40 ok, 0 skipped" in capsys.readouterr().out


def t2i_data(tmp_path, *args):
    env = {**os.environ, "T2I_OUTPUTS": str(tmp_path / "logs")}
    return subprocess.run([sys.executable, "-m", "t2i.cli.data", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_errors_are_one_line(tmp_path):
    res = t2i_data(tmp_path, "convert", "input=/no/such.tsv", "output=x")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "input=/no/such.tsv" in res.stderr
    res = t2i_data(tmp_path, "convert", "output=x")
    assert res.returncode == 1 and "`input=...` is required" in res.stderr
    res = t2i_data(tmp_path, "convert", "source=parquet", "input=a", "output=x")
    assert res.returncode == 1 and "source=parquet is unknown; use one of easynlp_tsv" in res.stderr
    res = t2i_data(tmp_path, "frobnicate")
    assert res.returncode == 1 and "unknown command 'frobnicate'" in res.stderr
    res = t2i_data(tmp_path)
    assert res.returncode == 2 and "t2i-data shapes" in res.stderr


def test_convert_reports_skips_and_refuses_to_mix_shards(tmp_path, capsys):
    import base64
    import io

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(buf, format="PNG")
    good = base64.b64encode(buf.getvalue()).decode()
    tsv = tmp_path / "t.tsv"
    tsv.write_text("".join(f"{i}\tred\t{good}\n" for i in range(199)) + "199\tred\tnot*base64\n")
    summary = run(data_cfg(tmp_path, "command=convert", f"input={tsv}", f"output={tmp_path}/s"))
    assert summary["written"] == 199 and summary["skipped"] == {"bad_base64": 1}
    assert f"bad_base64: 1 (e.g. {tsv}:200)" in capsys.readouterr().out
    res = t2i_data(tmp_path, "convert", f"input={tsv}", f"output={tmp_path}/s")
    assert res.returncode == 1 and "overwrite" in res.stderr
    res = t2i_data(tmp_path, "convert", f"input={tsv}", f"output={tmp_path}/s", "overwrite=true")
    assert res.returncode == 0, res.stderr
    assert len(list(Path(tmp_path / "s").glob("*.tar"))) == 1


def _png_b64(color=(255, 0, 0)) -> str:
    import base64
    import io

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_require_images_reaches_the_readers(tmp_path, capsys):
    caps = tmp_path / "caps.tsv"  # EasyNLP's 2-column test form: captions only
    caps.write_text("a\tred circle\nb\tblue square\n", encoding="utf-8")
    res = t2i_data(tmp_path, "inspect", f"input={caps}")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert f"input={caps}: no image column" in res.stderr and "`require_images=false`" in res.stderr
    stats = run(data_cfg(tmp_path, "command=inspect", f"input={caps}", "require_images=false"))
    assert stats["captions"] == 2 and "preview_decode_failures" not in stats

    muge = tmp_path / "muge"
    muge.mkdir()
    (muge / "T2I_test.text.tsv").write_text("1\t连衣裙\n2\t鞋子\n", encoding="utf-8")
    res = t2i_data(tmp_path, "inspect", "source=muge", f"input={muge}", "split=test")
    assert res.returncode == 1 and "T2I_test.img.tsv not found" in res.stderr
    assert "read them with `require_images=false`" in res.stderr
    stats = run(data_cfg(tmp_path, "command=inspect", "source=muge", f"input={muge}", "split=test",
                         "require_images=false"))
    assert stats["images"] == 2 and stats["captions"] == 2
    assert "2 ok, 0 skipped" in capsys.readouterr().out


def test_inspect_fails_past_max_bad_fraction(tmp_path, capsys):
    tsv = tmp_path / "t.tsv"
    good = _png_b64()
    tsv.write_text("".join(f"{i}\tred\t{good}\n" for i in range(9)) + "9\tred\n9b\n", encoding="utf-8")
    res = t2i_data(tmp_path, "inspect", f"input={tsv}")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "2 of 11 samples were bad" in err[0]
    assert f"worst file: {tsv} (2 bad)" in err[0] and "raise max_bad_fraction." in err[0]
    assert "9 ok, 2 skipped" in res.stdout  # the stats are printed first
    stats = run(data_cfg(tmp_path, "command=inspect", f"input={tsv}", "max_bad_fraction=0.2"))
    assert stats["images"] == 9 and stats["skipped_while_indexing"] == {"bad_columns": 2}


def test_check_oracle_warns_below_99_percent_and_counts_unreadable(tmp_path, capsys):
    from t2i.cli.data import check_oracle

    sh = tmp_path / "sh"
    run(data_cfg(tmp_path, "command=shapes", f"output={sh}", "n_train=8", "n_val=8", "n_test=8",
                 "n_compositional=8", "image_size=32"))
    assert "warning" not in capsys.readouterr().err
    # one spec no longer matches its image, one image is not base64: warned about, no traceback
    jsonl = sh / "shapes_test.jsonl"
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    spec = rows[0]["spec"]
    spec["color"] = next(c for c in ("red", "blue") if c != spec["color"])
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tsv = sh / "shapes_test.tsv"
    lines = tsv.read_text(encoding="utf-8").splitlines()
    lines[1] = lines[1].rsplit("\t", 1)[0] + "\t***"
    tsv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = check_oracle(sh, "test")
    assert result["n"] == 7 and result["unreadable"] == 1 and result["all"] == 6 / 7
    err = capsys.readouterr().err
    assert f"bad_base64: 1 (e.g. {tsv}:2)" in err
    assert "warning: the oracle reads only 85.7% of the ground-truth test images" in err and "< 99%" in err


def _png_b64_size(size, color=(255, 0, 0)) -> str:
    import base64
    import io

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_filter_rules_report_and_clip_threshold(tmp_path):
    rows = [
        ("ok1", "a red square", (16, 16)), ("ok2", "一个红色", (24, 16)), ("small", "a red square", (6, 6)),
        ("wide", "a red square", (40, 16)), ("short", "x", (16, 16)), ("ok3", "a red circle", (16, 20)),
    ]
    tsv = tmp_path / "t.tsv"
    tsv.write_text("".join(f"{k}\t{c}\t{_png_b64_size(s)}\n" for k, c, s in rows) + "bad\tred\tnot*base64\n",
                   encoding="utf-8")
    report = run(data_cfg(tmp_path, "command=filter", f"input={tsv}", f"output={tmp_path}/f", "filter.min_side=8",
                          "filter.min_caption_len=3", "max_bad_fraction=0.5"))
    assert report["read"] == 7 and report["kept"] == 3
    assert report["dropped_images"] == {"min_side": 1, "aspect": 1, "caption_length": 1, "clip_score": 0}
    assert report["skipped_bad"] == {"bad_base64": 1}
    kept = open_source("wds", str(tmp_path / "f" / "*.tar"))
    assert sorted(r.captions[0] for r in kept.records(SkipLog())) == ["a red circle", "a red square", "一个红色"]
    assert json.loads((tmp_path / "f" / "filter_report.json").read_text())["kept"] == 3

    # with a CLIP reranker: every caption is scored; a threshold at the median keeps about half
    from t2i.cli.train import train
    from tests.test_clip import compose_clip

    _, obj = train(compose_clip(tmp_path / "clip", "debug=fdr"))
    ckpt = tmp_path / "clip.ckpt"
    obj["trainer"].save_checkpoint(ckpt)
    scored = run(data_cfg(tmp_path, "command=filter", f"input={tsv}", f"output={tmp_path}/g", "filter.min_side=8",
                          f"filter.clip.ckpt={ckpt}", "filter.clip.image_size=16", "max_bad_fraction=0.5"))
    assert scored["clip_scores"]["n"] == 4 and (tmp_path / "g" / "scores.png").exists()
    median = scored["clip_scores"]["quantiles"]["50%"]
    half = run(data_cfg(tmp_path, "command=filter", f"input={tsv}", f"output={tmp_path}/h", "filter.min_side=8",
                        f"filter.clip.ckpt={ckpt}", "filter.clip.image_size=16", f"filter.clip.threshold={median}",
                        "max_bad_fraction=0.5"))
    assert 1 <= half["kept"] <= 3 and half["dropped_images"]["clip_score"] == 4 - half["kept"]
    res = t2i_data(tmp_path, "filter", f"input={tsv}", f"output={tmp_path}/z", "filter.clip.threshold=0.2")
    assert res.returncode == 1 and "filter.clip.ckpt" in res.stderr


def test_filter_killed_midway_leaves_nothing_a_later_run_reads(tmp_path, monkeypatch):
    """Issue 30 item 14: the shards are written aside and moved in at the end; a kill after two shards were
    written leaves the output as it was (no shard, no report), and the rerun is not refused."""
    from t2i.data.filter import filter_pairs
    from t2i.data.formats import open_source as source_of

    tsv = tmp_path / "t.tsv"
    tsv.write_text("".join(f"k{i}\ta red square {i}\t{_png_b64_size((16, 16))}\n" for i in range(8)), encoding="utf-8")
    src = source_of("easynlp_tsv", str(tsv))
    real, seen = src.load_sample, []

    def killed(rec):
        seen.append(rec.key)
        if len(seen) == 6:
            raise KeyboardInterrupt
        return real(rec)

    monkeypatch.setattr(src, "load_sample", killed)
    out = tmp_path / "f"
    with pytest.raises(KeyboardInterrupt):
        filter_pairs(src, out, min_side=8, shard_size=2)
    assert not out.exists() and not list(tmp_path.glob(".f.converting-*"))
    monkeypatch.setattr(src, "load_sample", real)
    report = filter_pairs(src, out, min_side=8, shard_size=2)
    assert report["kept"] == 8 and sorted(p.name for p in out.iterdir()) == [
        "filter_report.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar", "shard-000003.tar"]
    assert report["shards"][0] == str(out / "shard-000000.tar")


def test_convert_empty_folder_and_file_output_are_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    res = t2i_data(tmp_path, "convert", "source=folder", f"input={tmp_path}/empty", f"output={tmp_path}/s")
    assert res.returncode == 1 and res.stderr.strip().splitlines() == [
        f"error: input={tmp_path}/empty: no samples found for source=folder; check the path and the source reader "
        f"(nothing was written)"]
    assert not (tmp_path / "s").exists()
    tsv = tmp_path / "t.tsv"
    tsv.write_text(f"1\tred\t{_png_b64()}\n", encoding="utf-8")
    (tmp_path / "out.tar").write_bytes(b"")
    res = t2i_data(tmp_path, "convert", f"input={tsv}", f"output={tmp_path}/out.tar")
    assert res.returncode == 1 and res.stderr.strip().splitlines() == [
        f"error: output={tmp_path}/out.tar is a file, not a folder: pass a folder (it is created when missing)"]
