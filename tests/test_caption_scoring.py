"""Captioning evaluation (issue 20): BLEU / CIDEr-D / ROUGE-L equal pycocoevalcap's own numbers on the same
tokens (and a hand-computed BLEU-1), the tokenization rules, the MUGE captioning reader's skips, and
``t2i-eval eval=shapes_caption`` / ``eval=muge_caption`` on a tiny random captioning checkpoint."""

from __future__ import annotations

import base64
import io
import json
import math

import pytest
import torch
from PIL import Image

from t2i.metrics.captioning import joined, score_captions, tokenize

HYPS = {"a": "一个红色的圆形在左上角", "b": "蓝色方块，在右边。", "c": "一个小的绿色三角形"}
REFS = {"a": ["一个大的红色圆形在左上角", "红色圆形位于左上方"],
        "b": ["一个小的蓝色方块在右边", "右边有一个蓝色的方块"],
        "c": ["一个小的绿色三角形在中间", "绿色三角形在中央", "中间是一个小的绿色三角形"]}


def test_tokenization_rules():
    # zh: NFKC, lowercase, one token per character, whitespace and punctuation (Unicode P*) dropped
    assert tokenize("红色圆形，在左上角！ iPhone１１") == list("红色圆形在左上角") + list("iphone11")
    assert tokenize("“大的”　蓝色—方块。") == list("大的蓝色方块")
    # en: NFKC, lowercase, punctuation -> space, whitespace split
    assert tokenize("A large red circle, in the top-left.", "en") == "a large red circle in the top left".split()
    assert joined("蓝色，方块") == "蓝 色 方 块"
    with pytest.raises(ValueError, match="lang="):
        tokenize("x", "fr")


def test_scores_equal_pycocoevalcap_on_the_same_tokens():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ours = score_captions(HYPS, REFS, "zh")
    gts = {k: [" ".join(tokenize(r)) for r in v] for k, v in REFS.items()}
    res = {k: [" ".join(tokenize(h))] for k, h in HYPS.items()}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, cider_each = Cider().compute_score(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
    assert [ours[f"bleu{i}"] for i in range(1, 5)] == pytest.approx(bleu, abs=1e-12)
    assert ours["cider"] == pytest.approx(cider, abs=1e-12) and ours["rouge_l"] == pytest.approx(rouge, abs=1e-12)
    assert [ours["per_image"][k]["cider"] for k in HYPS] == pytest.approx(list(cider_each), abs=1e-12)
    assert 0 < ours["bleu4"] < ours["bleu1"] < 1 and ours["cider"] > 0 and 0 < ours["rouge_l"] < 1
    # English captions are scored on words
    en = score_captions({"x": "a red circle"}, {"x": ["a red circle", "the red circle"]}, "en")
    assert en["bleu1"] == pytest.approx(1.0, abs=1e-6)


def test_bleu1_by_hand():
    # hypothesis 4 characters, all in the one 5-character reference: precision 1, brevity penalty exp(1 - 5/4)
    s = score_captions({"x": "红色圆形"}, {"x": ["红色的圆形"]})
    assert s["bleu1"] == pytest.approx(math.exp(1 - 5 / 4), abs=1e-6)
    # two of four characters match (clipped counts): precision 1/2, same lengths so no penalty
    s = score_captions({"x": "红红蓝蓝"}, {"x": ["红色圆蓝"]})
    assert s["bleu1"] == pytest.approx(0.5, abs=1e-6)


def png_b64(color, urlsafe=True) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (12, 10), color).save(buf, "PNG")
    return (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(buf.getvalue()).decode()


def write_muge_ic(root, bad_image=False):
    """A tiny IC_valid.jsonl / IC_valid.tsv with every kind of bad row; 3 good images."""
    root.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"image_id": "i1", "text": ["红色的方块", "一个红色方块"]}, ensure_ascii=False),
             json.dumps({"image_id": 2, "text": "蓝色的方块"}, ensure_ascii=False),           # int id, one string
             "{not json",                                                                    # bad_columns
             json.dumps({"image_id": "i4"}),                                                 # bad_columns (no text)
             json.dumps({"image_id": "i5", "text": ["", "  "]}),                             # empty_caption
             json.dumps({"image_id": "i1", "text": ["重复"]}, ensure_ascii=False),           # duplicate
             json.dumps({"image_id": "i7", "text": ["没有图片"]}, ensure_ascii=False),       # missing_image
             json.dumps({"image_id": "i8", "text": ["绿色的方块", ""]}, ensure_ascii=False)]  # blank entry dropped
    (root / "IC_valid.jsonl").write_bytes("\n".join(lines).encode() + b"\n" + b'{"image_id": "\xff"}\n')
    tsv = [f"i1\t{png_b64('red')}", f"2\t{png_b64('blue', urlsafe=False)}",
           f"i8\t{png_b64('green') if not bad_image else 'not*base64'}",
           f"i9\t{png_b64('white')}",      # missing_caption
           f"i1\t{png_b64('black')}",      # duplicate
           "i5\tAAAA\textra",              # bad_columns
           f"i5\t{png_b64('gray')}"]       # its caption line was bad: counted there only
    (root / "IC_valid.tsv").write_text("\n".join(tsv) + "\n")
    return root


def test_muge_caption_reader_counts_bad_rows(tmp_path):
    from t2i.data.formats import open_source
    from t2i.data.skips import SkipLog

    src = open_source("muge_caption", write_muge_ic(tmp_path / "ic"), "valid")
    log = SkipLog(1.0)
    recs = src.records(log)
    assert [(r.key, r.captions) for r in recs] == [("i1", ["红色的方块", "一个红色方块"]), ("2", ["蓝色的方块"]),
                                                   ("i8", ["绿色的方块"])]
    assert dict(log.by_reason) == {"bad_columns": 3, "empty_caption": 1, "duplicate": 2, "missing_image": 1,
                                   "missing_caption": 1, "bad_utf8": 1}
    assert src.load(recs[1]).getpixel((0, 0)) == (0, 0, 255)  # standard and url-safe base64 both decode
    assert src.load(recs[0]).getpixel((0, 0)) == (255, 0, 0)
    # OFA-Chinese's file names, explicit files, captions only
    (tmp_path / "ofa").mkdir()
    (tmp_path / "ofa" / "valid_caption.jsonl").write_bytes((tmp_path / "ic" / "IC_valid.jsonl").read_bytes())
    (tmp_path / "ofa" / "valid_image.tsv").write_bytes((tmp_path / "ic" / "IC_valid.tsv").read_bytes())
    assert [r.key for r in open_source("muge_caption", tmp_path / "ofa", "valid").records(SkipLog(1.0))] == \
        ["i1", "2", "i8"]
    only = open_source("muge_caption", captions=tmp_path / "ic" / "IC_valid.jsonl", require_images=False)
    assert [r.key for r in only.records(SkipLog(1.0))] == ["i1", "2", "i7", "i8"]
    from t2i.data.skips import DataError

    with pytest.raises(DataError, match="no IC_test.jsonl"):
        open_source("muge_caption", tmp_path / "ic", "test")


# -- t2i-eval on a tiny random captioning checkpoint ----------------------------------------------------------
@pytest.fixture
def caption_ckpt(tmp_path):
    """A random tiny transformer with the captioning direction, as t2i-train writes it: a PoolTokenizer (8 px
    images of 2x2 codes), a text tokenizer trained on the Shapes Chinese captions."""
    from t2i.data.shapes import captions, make_split
    from t2i.data.tokenizer import TextTokenizer
    from t2i.lit.transformer import TransformerModule
    from tests.toy_tokenizer import save_checkpoint

    save_checkpoint(tmp_path / "tok.ckpt", downsample=4, levels=2)
    texts = [c for s in make_split("train", 40, image_size=8) for c in captions(s.spec, "zh")]
    tok = TextTokenizer.train(texts, vocab_size=80)
    torch.manual_seed(0)
    module = TransformerModule(model=dict(text_vocab=tok.vocab_size, text_pad_id=0, image_vocab=8,
                                          image_grid=[2, 2], text_len=8, n_layer=1, n_head=2, d_model=16,
                                          captioning=True),
                               image_tokenizer=str(tmp_path / "tok.ckpt"))
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
            "datamodule": {"tokenizer": tok.to_str()}}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "cap.ckpt")
    return tmp_path / "cap.ckpt"


def eval_cfg(tmp_path, *overrides):
    from hydra import compose, initialize_config_module

    with initialize_config_module("t2i.conf", version_base="1.3"):
        return compose("eval", overrides=[f"paths.root_dir={tmp_path}", f"output={tmp_path}/out", "progress=false",
                                          "device=cpu", *overrides])


def test_eval_shapes_caption_scores_what_it_wrote(caption_ckpt, tmp_path):
    from t2i.cli.evaluate import run
    from t2i.data.shapes import ShapeSpec, parse_caption

    result = run(eval_cfg(tmp_path, "eval=shapes_caption", f"ckpt={caption_ckpt}", "eval.num_images=5",
                          "batch_size=2", "eval.caption.beam_size=2"))
    rows = [json.loads(line) for line in (tmp_path / "out" / "captions.jsonl").read_text().splitlines()]
    assert [r["split"] for r in rows] == ["test"] * 5 + ["compositional"] * 5
    assert (tmp_path / "out" / "captions.png").is_file() and (tmp_path / "out" / "metrics.json").is_file()
    for split in ("test", "compositional"):
        got = [r for r in rows if r["split"] == split]
        m = result["splits"][split]
        again = score_captions({str(i): r["caption"] for i, r in enumerate(got)},
                               {str(i): r["references"] for i, r in enumerate(got)})
        assert {k: m[k] for k in ("bleu4", "cider", "rouge_l")} == {k: again[k] for k in ("bleu4", "cider", "rouge_l")}
        assert all(len(r["references"]) >= 2 for r in got)  # every Chinese template of the spec
        parsed = [parse_caption(r["caption"], "zh") for r in got]
        assert m["acc"]["all"] == sum(p == ShapeSpec.from_dict(r["spec"]) for p, r in zip(parsed, got)) / 5
        assert m["n"] == 5 and m["skipped"] == 0
    assert result["summary"]["acc"] == result["splits"]["test"]["acc"]["all"]
    assert set(result["summary"]) == {"bleu4", "cider", "rouge_l", "acc", "acc_compositional"}
    # the same captions whatever the batch size (beam search is deterministic)
    again = run(eval_cfg(tmp_path, "eval=shapes_caption", f"ckpt={caption_ckpt}", "eval.num_images=5",
                         "batch_size=5", "eval.caption.beam_size=2", f"output={tmp_path}/out2"))
    rows2 = [json.loads(line) for line in (tmp_path / "out2" / "captions.jsonl").read_text().splitlines()]
    assert [r["caption"] for r in rows2] == [r["caption"] for r in rows]
    assert again["summary"] == result["summary"]


def test_eval_shapes_caption_accuracy_counts_parsed_attributes():
    from t2i.data.shapes import ShapeSpec, caption
    from t2i.eval.captioning import shapes_accuracy

    truth = [ShapeSpec("red", "circle", "top_left", "large"), ShapeSpec("blue", "square", "centre", "small")]
    hyps = [caption(truth[0], "zh"), caption(ShapeSpec("blue", "triangle", "centre", "small"), "zh")]
    acc = shapes_accuracy(hyps + ["看不懂"], truth + [truth[0]], "zh")
    assert acc == {"color": 2 / 3, "shape": 1 / 3, "position": 2 / 3, "size": 2 / 3, "all": 1 / 3,
                   "parsed": 2 / 3}


def test_eval_muge_caption_skips_bad_images(caption_ckpt, tmp_path):
    from t2i.cli.evaluate import run

    root = write_muge_ic(tmp_path / "ic", bad_image=True)
    result = run(eval_cfg(tmp_path, "eval=muge_caption", f"ckpt={caption_ckpt}", f"eval.split.root={root}",
                          "eval.max_bad_fraction=1.0", "eval.caption.method=greedy"))
    m = result["splits"]["valid"]
    assert m["n"] == 2 and m["skipped"] == 1 and "bad_base64" in m["skipped_examples"][0]
    assert m["rows_skipped"] == {"bad_columns": 3, "empty_caption": 1, "duplicate": 2, "missing_image": 1,
                                 "missing_caption": 1, "bad_utf8": 1}
    from t2i.data.skips import DataError

    with pytest.raises(DataError, match="9 of 12 samples were bad"):  # the default max_bad_fraction=0.01
        run(eval_cfg(tmp_path, "eval=muge_caption", f"ckpt={caption_ckpt}", f"eval.split.root={root}"))
    rows = [json.loads(line) for line in (tmp_path / "out" / "captions.jsonl").read_text().splitlines()]
    assert [r["key"] for r in rows] == ["i1", "2"] and rows[0]["references"] == ["红色的方块", "一个红色方块"]
    again = score_captions({r["key"]: r["caption"] for r in rows}, {r["key"]: r["references"] for r in rows})
    assert m["cider"] == again["cider"] and m["bleu4"] == again["bleu4"]


def test_caption_settings_fail_before_the_model_loads(tmp_path):
    from t2i.cli.evaluate import run
    from t2i.errors import ConfigError

    for override, message in [("eval.caption.method=topk", "eval.caption.method='topk'"),
                              ("eval.caption.beam_size=0", "eval.caption.beam_size=0 must be"),
                              ("eval.lang=fr", "eval.lang=fr is unknown; use zh or en")]:
        with pytest.raises(ConfigError, match=message):
            run(eval_cfg(tmp_path, "eval=shapes_caption", f"ckpt={tmp_path}/none.ckpt", override))
