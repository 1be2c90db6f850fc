"""Text tokenizer: training, encode/decode, save/load, BERT vocab.txt, fingerprints, caption files."""

from __future__ import annotations

import base64

import pytest
import torch

from t2i.data.skips import DataError
from t2i.data.tokenizer import TextTokenizer, check_same, train_tokenizer

ZH = "一个大的红色圆形在左上角"
EN = "a large red circle in the top left"
MIX = "红色 circle 在 left"
CORPUS = [
    ZH,
    EN,
    MIX,
    "一个小的蓝色方形在右下角",
    "a small blue square in the bottom right",
    "绿色三角形，在中间。",
    "A Green Triangle in the middle",
] * 3


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.train(CORPUS, vocab_size=200)


def test_train_specials_and_cjk_alphabet(tok):
    assert [tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id] == [0, 1, 2, 3]
    assert tok.tok.token_to_id("[MASK]") == 4
    vocab = tok.tok.get_vocab()
    assert all(c in vocab for c in "一个大的红色圆形在左上角蓝方右下绿三中间")
    assert tok.vocab_size == len(tok.tok.get_vocab(with_added_tokens=True))
    # a tiny vocab still gives every CJK char its own token, also when streamed from a generator
    small = TextTokenizer.train((t for t in CORPUS), vocab_size=10)
    assert all(c in small.tok.get_vocab() for c in "一个大的红色圆形在左上角蓝方右下绿三中间")
    assert small.vocab_size > 10


def test_encode_shape_padding_truncation(tok):
    ids = tok.encode([ZH, EN, ""], text_len=8)
    assert ids.shape == (3, 8) and ids.dtype == torch.long
    assert ids[0].tolist() == [tok.tok.token_to_id(c) for c in ZH[:8]]  # 12 chars cut to 8
    assert (ids[2] == tok.pad_id).all()
    assert tok.n_truncated == 1 and tok.n_encoded == 3
    assert tok.truncation_report() == "tokenizer: 1 of 3 captions truncated to text_len=8"
    one = tok.encode("红色", text_len=4)
    assert one.tolist() == [[tok.tok.token_to_id("红"), tok.tok.token_to_id("色"), 0, 0]]
    assert tok.n_encoded == 4 and tok.n_truncated == 1


def test_add_special_keeps_sep(tok):
    ids = tok.encode(ZH, text_len=6, add_special=True)[0].tolist()
    assert ids == [tok.cls_id, *[tok.tok.token_to_id(c) for c in ZH[:4]], tok.sep_id]
    short = tok.encode("红色", text_len=6, add_special=True)[0].tolist()
    assert short == [tok.cls_id, tok.tok.token_to_id("红"), tok.tok.token_to_id("色"), tok.sep_id, 0, 0]
    assert tok.decode(short) == "红色"


@pytest.mark.parametrize("text", [ZH, EN, MIX, "a green triangle in the middle", "绿色三角形，在中间。"])
def test_decode_round_trip(tok, text):
    ids = tok.encode(text, text_len=48)
    assert tok.unk_id not in ids[0].tolist()
    assert tok.decode(ids[0]) == text
    assert tok.decode(ids) == [text]


def test_decode_normalises_and_merges_pieces(tok):
    assert tok.decode(tok.encode("A Green Triangle", text_len=16)[0]) == "a green triangle"
    circ = [tok.tok.token_to_id(t) for t in ("c", "##i", "##r", "##c", "##l", "##e")]
    assert tok.decode(circ) == "circle"
    assert tok.decode([tok.cls_id, tok.tok.token_to_id("红"), tok.sep_id, 0, 0]) == "红"


def test_unknown_chars_are_unk(tok):
    ids = tok.encode("猫", text_len=3)[0].tolist()
    assert ids == [tok.unk_id, 0, 0]


def test_bpe_model_round_trip():
    bpe = TextTokenizer.train(CORPUS, vocab_size=120, model="bpe")
    assert [bpe.pad_id, bpe.unk_id, bpe.cls_id, bpe.sep_id] == [0, 1, 2, 3]
    for text in (ZH, EN, MIX):
        assert bpe.decode(bpe.encode(text, text_len=48)[0]) == text
    with pytest.raises(DataError, match="wordpiece"):
        TextTokenizer.train(CORPUS, model="unigram")


def test_save_load_and_str(tok, tmp_path):
    path = tok.save(tmp_path / "sub" / "tokenizer.json")
    back = TextTokenizer.from_file(path)
    texts = [ZH, EN, MIX]
    assert torch.equal(back.encode(texts, 20), tok.encode(texts, 20))
    assert back.fingerprint == tok.fingerprint and len(tok.fingerprint) == 16
    again = TextTokenizer.from_str(tok.to_str())
    assert again.fingerprint == tok.fingerprint
    assert torch.equal(again.encode(texts, 20, add_special=True), tok.encode(texts, 20, add_special=True))
    assert (
        TextTokenizer.from_file(tmp_path / "sub").fingerprint == tok.fingerprint
    )  # folder with tokenizer.json


def _write_vocab(path):
    tokens = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "红",
        "色",
        "圆",
        "形",
        "，",
        "red",
        "circ",
        "##le",
        "##s",
        "a",
    ]
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return {t: i for i, t in enumerate(tokens)}


def test_bert_vocab_txt(tmp_path):
    v = _write_vocab(tmp_path / "vocab.txt")
    bert = TextTokenizer.from_file(tmp_path / "vocab.txt")
    assert (bert.pad_id, bert.unk_id, bert.cls_id, bert.sep_id, bert.vocab_size) == (0, 1, 2, 3, 15)
    ids = bert.encode("红色圆形，A Red Circles 猫", text_len=12, add_special=True)[0].tolist()
    assert ids == [
        2,
        v["红"],
        v["色"],
        v["圆"],
        v["形"],
        v["，"],
        v["a"],
        v["red"],
        v["circ"],
        v["##le"],
        v["##s"],
        3,
    ]
    assert bert.n_truncated == 1  # the trailing 猫 ([UNK]) was cut before [SEP]
    assert bert.encode("猫 blue", text_len=3)[0].tolist() == [1, 1, 0]
    assert bert.decode(ids) == "红色圆形，a red circles"
    copy = TextTokenizer.from_str(bert.to_str())
    assert copy.fingerprint == bert.fingerprint and copy.encode("红色", 4).tolist() == [[5, 6, 0, 0]]


def test_check_same(tok, tmp_path):
    check_same(tok, TextTokenizer.from_str(tok.to_str()), "ckpt/last.ckpt")
    _write_vocab(tmp_path / "vocab.txt")
    other = TextTokenizer.from_file(tmp_path / "vocab.txt")
    with pytest.raises(DataError) as e:
        check_same(tok, other, "ckpt/last.ckpt")
    msg = str(e.value)
    assert f"vocab {tok.vocab_size}," in msg and "vocab 15," in msg
    assert "ckpt/last.ckpt" in msg and tok.fingerprint in msg and other.fingerprint in msg
    assert "data.tokenizer" in msg


def test_from_file_errors(tmp_path):
    with pytest.raises(DataError) as e:
        TextTokenizer.from_file(tmp_path / "nope.json", key="model.text_tokenizer")
    assert "nope.json" in str(e.value) and "model.text_tokenizer" in str(e.value)
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match="tokenizer.json"):
        TextTokenizer.from_file(tmp_path / "bad.json")
    (tmp_path / "words.txt").write_text("hello\nworld\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"vocab\.txt"):
        TextTokenizer.from_file(tmp_path / "words.txt")
    (tmp_path / "blob.bin").write_bytes(b"\xff\xfe\x00\x89PNG garbage")
    with pytest.raises(DataError, match="expected"):
        TextTokenizer.from_file(tmp_path / "blob.bin")
    with pytest.raises(DataError, match="not a valid"):
        TextTokenizer.from_str("garbage")


def test_train_tokenizer_easynlp_tsv(tmp_path, capsys):
    b64 = base64.b64encode(b"\x89PNG" + bytes(range(256)) * 4).decode()
    rows = [f"{i}\t{t}\t{b64}" for i, t in enumerate(CORPUS)] + ["99\t\t" + b64]
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = tmp_path / "tok" / "tokenizer.json"
    t = train_tokenizer(str(tmp_path / "train.tsv"), str(out), vocab_size=200)
    assert out.is_file() and TextTokenizer.from_file(out).fingerprint == t.fingerprint
    assert t.decode(t.encode(ZH, 20)[0]) == ZH
    assert all(len(tok) < 40 for tok in t.tok.get_vocab())  # nothing from the base64 column
    line = capsys.readouterr().out
    assert f"from {len(CORPUS)} captions in 1 file(s)" in line and "1 blank/bad lines skipped" in line
    assert "CJK chars in vocab" in line and f"vocab {t.vocab_size}" in line


def test_train_tokenizer_text_files_and_glob(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("\n".join(CORPUS[:4]) + "\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("\n".join(CORPUS[4:7]) + "\n", encoding="utf-8")
    t = train_tokenizer(str(tmp_path / "*.txt"), tmp_path / "t.json", vocab_size=150, model="bpe")
    assert "from 7 captions in 2 file(s)" in capsys.readouterr().out
    assert t.decode(t.encode(MIX, 20)[0]) == MIX
    t2 = train_tokenizer([tmp_path / "a.txt"], tmp_path / "t2.json", vocab_size=150)
    assert "from 4 captions in 1 file(s)" in capsys.readouterr().out
    assert t2.fingerprint != t.fingerprint
    # MUGE-style id\ttext with a named header column
    (tmp_path / "muge.tsv").write_text("id\tcaption\n1\t红色圆形\n2\t蓝色方形\n", encoding="utf-8")
    t3 = train_tokenizer(tmp_path / "muge.tsv", tmp_path / "t3.json", text_column="caption")
    assert "from 2 captions" in capsys.readouterr().out and "id" not in t3.tok.get_vocab()
    with pytest.raises(DataError, match="input"):
        train_tokenizer(tmp_path / "missing.txt", tmp_path / "t4.json")
    with pytest.raises(DataError, match="matches no files"):
        train_tokenizer(str(tmp_path / "*.nothing"), tmp_path / "t4.json")


def test_train_tokenizer_folder_skips_image_tsv_id_lists_and_payloads(tmp_path, capsys):
    payload = base64.b64encode(b"\x89PNG" + bytes(range(256)) * 8).decode()  # > 1000 chars, no spaces
    muge = tmp_path / "muge"
    muge.mkdir()
    (muge / "T2I_train.text.tsv").write_text("1\t红色圆形\n2\t蓝色方形\n", encoding="utf-8")
    (muge / "T2I_train.img.tsv").write_text(f"1\t{payload}\n2\t{payload}\n", encoding="utf-8")
    coco = tmp_path / "coco-cn"
    coco.mkdir()
    (coco / "coco-cn_train.txt").write_text("COCO_train2014_000000000009\n", encoding="utf-8")
    (coco / "imageid.human-written-caption.txt").write_text(
        "COCO_train2014_000000000009#0\t绿色三角形\n", encoding="utf-8"
    )
    # inside a caption file, a base64 payload is no caption either (a lone one, or a stray column)
    (tmp_path / "extra.txt").write_text(f"a large red circle\n{payload}\n", encoding="utf-8")
    t = train_tokenizer(tmp_path, tmp_path / "t.json", vocab_size=200)
    out = capsys.readouterr().out
    assert "from 4 captions in 3 file(s)" in out
    assert "0 blank/bad lines skipped, 1 non-caption values skipped (over 1000 chars" in out
    assert (f"skipped 2 file(s) in the input folder that hold no captions: {coco / 'coco-cn_train.txt'}, "
            f"{muge / 'T2I_train.img.tsv'}") in out
    vocab = t.tok.get_vocab()
    assert all(len(tok) < 40 for tok in vocab) and "coco_train2014_000000000009" not in vocab
    assert "000000000009" not in "".join(vocab)

    # an img.tsv named explicitly is read, but its base64 column is no caption
    with pytest.raises(DataError, match="no captions found in 1 file.*, 2 non-caption values skipped"):
        train_tokenizer(muge / "T2I_train.img.tsv", tmp_path / "t2.json")
