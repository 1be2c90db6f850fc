"""Imported text tokenizers (t2i.data.vocabs) give the original tokenizers' ids: Hugging Face
``BertTokenizer`` for EasyNLP's BERT vocab.txt, ``youtokentome`` (+ ruDALL-E's wrap/pad rule) for ruDALL-E's."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch

from t2i.data.skips import DataError
from t2i.data.tokenizer import TextTokenizer
from t2i.data.vocabs import bert_tokenizer, load_text_tokenizer, read_yttm, yttm_tokenizer

yttm = pytest.importorskip("youtokentome")
transformers = pytest.importorskip("transformers")

_spec = importlib.util.find_spec("cn_clip")
VOCAB = Path(_spec.submodule_search_locations[0]) / "clip" / "vocab.txt" if _spec else None
needs_vocab = pytest.mark.skipif(VOCAB is None or not VOCAB.is_file(), reason="cn_clip's BERT vocab.txt absent")

RU = ("ёлка йод йогурт съешь ещё этих мягких французских булок да выпей же чаю Ёжик Йошкар-Ола район "
      "красный синий круг квадрат большой маленький котёнок на столе рисунок маслом небо облака").split()
EN = ("the quick brown fox jumps over a lazy dog red blue circle square painting of cat on table "
      "Sky CLOUDS watercolor sunset mountains").split()
ACCENT = ["café", "naïve", "Ångström", "Zoë", "e\u0301te\u0301", "São", "façade", "İstanbul", "Straße"]
ODD = ["😀", "🐱‍👤", "[MASK]", "[unk]", "<BOS>", "<UNK>", "▁", "\u2581x", "ﬁ", "①", "℃", "\x00", "\ufffd",
       "\u200b", "a" * 120, "й" * 101, "…", "«ёж»", "—", "１２３", "ＡＢＣ"]
PUNCT = list(",.;:!?()[]{}\"'-/%$#@&*+=<>~^`|\\") + list("，。！？、；：“”（）《》")
SPACES = [" ", "  ", "\t", "\n", " \r\n ", "\xa0", "\u3000", "\x1c", "\x85", "\u2581"]


def _cjk(vocab_lines: list[str]) -> list[str]:
    return [t for t in vocab_lines if len(t) == 1 and 0x4E00 <= ord(t) <= 0x9FFF]


def mixed_strings(n: int = 1000, seed: int = 0, cjk: list[str] | None = None) -> list[str]:
    """Deterministic mixes of CJK chars, Russian / English words, digits, punctuation, accents, emoji and
    odd whitespace; some CJK chars outside the vocab (rare ideographs) too."""
    rng = random.Random(seed)
    cjk = cjk or [chr(c) for c in range(0x4E00, 0x4E00 + 2000)]
    rare = [chr(c) for c in (0x3400, 0x4DB5, 0x20000, 0x2A6D6, 0x9FFF)]
    out = []
    for i in range(n):
        parts = []
        for _ in range(rng.randint(1, 14)):
            kind = rng.random()
            if kind < 0.25:
                parts.append("".join(rng.choice(cjk) for _ in range(rng.randint(1, 6))))
            elif kind < 0.45:
                w = rng.choice(RU)
                parts.append(w.capitalize() if rng.random() < 0.2 else w)
            elif kind < 0.6:
                w = rng.choice(EN)
                parts.append(w.upper() if rng.random() < 0.1 else w)
            elif kind < 0.68:
                parts.append(str(rng.randint(0, 10 ** rng.randint(1, 6))))
            elif kind < 0.78:
                parts.append(rng.choice(PUNCT))
            elif kind < 0.84:
                parts.append(rng.choice(ACCENT))
            elif kind < 0.9:
                parts.append(rng.choice(ODD))
            elif kind < 0.93:
                parts.append(rng.choice(rare))
            else:
                parts.append(rng.choice(SPACES))
        glue = [rng.choice(["", " ", " ", "  ", rng.choice(SPACES)]) for _ in parts]
        s = "".join(g + p for g, p in zip(glue, parts, strict=True))
        if i % 7 == 0:
            s = rng.choice(SPACES) + s + rng.choice(SPACES)
        out.append(s)
    out[:3] = ["", "   ", "\u2581"]
    return out


# -- EasyNLP: BERT vocab.txt ------------------------------------------------------------------
@pytest.fixture(scope="module")
def bert_pair():
    if VOCAB is None or not VOCAB.is_file():
        pytest.skip("cn_clip's BERT vocab.txt absent")
    ref = transformers.BertTokenizer(str(VOCAB), do_lower_case=True)
    lines = VOCAB.read_text(encoding="utf-8").split("\n")
    return ref, bert_tokenizer(VOCAB), mixed_strings(1000, seed=1, cjk=_cjk(lines))


def _ref_bert_ids(ref, s: str) -> list[int]:
    return ref.convert_tokens_to_ids(ref.tokenize(s))


def test_bert_ids_equal_transformers(bert_pair):
    ref, tok, texts = bert_pair
    want = [_ref_bert_ids(ref, s) for s in texts]
    got = [e.ids for e in tok.tok.encode_batch(texts, add_special_tokens=False)]
    bad = [(s, w, g) for s, w, g in zip(texts, want, got, strict=True) if w != g]
    assert not bad, f"{len(bad)} of {len(texts)} differ, first: {bad[0]}"
    assert tok.vocab_size == 21128 and (tok.pad_id, tok.unk_id) == (0, 100)
    assert sum(len(w) for w in want) > 10_000 and sum(tok.unk_id in w for w in want) > 20  # a real mix
    # encode = those ids, padded with [PAD] = 0, no [CLS]/[SEP] (EasyNLP's text layout)
    ids = tok.encode(texts[3:8], text_len=32)
    for row, s in zip(ids.tolist(), texts[3:8], strict=True):
        w = _ref_bert_ids(ref, s)[:32]
        assert row == w + [0] * (32 - len(w))


@needs_vocab
def test_bert_import_strips_accents_where_from_file_does_not(bert_pair):
    ref, tok, _ = bert_pair
    ours = TextTokenizer.from_file(VOCAB)  # the existing path: accents kept, ids unchanged
    s = "йод café"
    assert tok.tok.encode(s).ids == _ref_bert_ids(ref, s) != ours.tok.encode(s).ids
    assert tok.fingerprint != ours.fingerprint


# -- ruDALL-E: YouTokenToMe BPE ----------------------------------------------------------------
def _corpus(path: Path, seed: int = 0) -> None:
    """Russian / English text with invented words, so merges go deep (vocab of a few thousand)."""
    rng = random.Random(seed)
    syl = ["ка", "ро", "ли", "мё", "йо", "ст", "пр", "ва", "ны", "ще", "зу", "th", "er", "in", "qu", "ay", "on"]
    lines = []
    for _ in range(4000):
        words = []
        for _ in range(rng.randint(3, 12)):
            r = rng.random()
            if r < 0.4:
                words.append(rng.choice(RU))
            elif r < 0.6:
                words.append(rng.choice(EN))
            elif r < 0.95:
                words.append("".join(rng.choice(syl) for _ in range(rng.randint(1, 4))))
            else:
                words.append(rng.choice(PUNCT[:12]) + str(rng.randint(0, 99)))
        lines.append(" ".join(words))
    lines.append("中文 字 😀 café")  # a few non-Cyrillic chars in the alphabet too
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def yttm_model(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("yttm")
    _corpus(d / "corpus.txt")
    yttm.BPE.train(data=str(d / "corpus.txt"), model=str(d / "bpe.model"), vocab_size=3000, n_threads=1)
    return d / "bpe.model"


@pytest.fixture(scope="module")
def yttm_pair(yttm_model):
    return yttm.BPE(model=str(yttm_model), n_threads=1), yttm_tokenizer(yttm_model), mixed_strings(1000, seed=2)


def _ref_yttm_ids(ref, texts: list[str]) -> list[list[int]]:
    return ref.encode(list(texts), output_type=yttm.OutputType.ID)


def _rudalle_encode(ref, text: str, text_len: int) -> list[int]:
    """ruDALL-E's ``encode_text`` rule, rewritten from its description: <BOS>=2 ids <EOS>=3, right-pad
    with <PAD>=0, or cut to text_len (the <EOS> goes first)."""
    ids = [2, *_ref_yttm_ids(ref, [text])[0], 3]
    return (ids + [0] * max(0, text_len - len(ids)))[:text_len]


def test_yttm_file_layout(yttm_model, yttm_pair):
    ref, tok, _ = yttm_pair
    chars, rules, specials = read_yttm(yttm_model)
    assert specials == {"<UNK>": 1, "<PAD>": 0, "<BOS>": 2, "<EOS>": 3}
    assert len(chars) + len(rules) + 4 == ref.vocab_size() == tok.vocab_size > 1000
    assert tok.tok.get_vocab() == {t: i for i, t in enumerate(ref.vocab())}  # same text for every id
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id) == (0, 1, 2, 3)


def test_yttm_ids_equal_youtokentome(yttm_pair):
    ref, tok, texts = yttm_pair
    want = _ref_yttm_ids(ref, texts)
    got = [e.ids for e in tok.tok.encode_batch(texts, add_special_tokens=False)]
    bad = [(s, w, g) for s, w, g in zip(texts, want, got, strict=True) if w != g]
    assert not bad, f"{len(bad)} of {len(texts)} differ, first: {bad[0]}"
    assert sum(len(w) for w in want) > 10_000 and sum(1 in w for w in want) > 100  # merges and <UNK> runs
    assert max(len(t) for w in want for t in map(ref.id_to_subword, w)) >= 6  # deep merges were used


def test_yttm_lowercase_option(yttm_model, yttm_pair):
    ref, _, texts = yttm_pair
    low = yttm_tokenizer(yttm_model, lowercase=True)
    want = _ref_yttm_ids(ref, [s.lower() for s in texts])
    assert [e.ids for e in low.tok.encode_batch(texts, add_special_tokens=False)] == want


def test_python_spaces_are_every_isspace_char():
    from t2i.data.vocabs import PY_SPACES

    assert sorted(PY_SPACES) == [chr(c) for c in range(0x110000) if chr(c).isspace()]


def test_yttm_strip_gives_rudalle_pipeline_ids_for_unicode_spaces(yttm_model, yttm_pair):
    """ruDALL-E's generate_images encodes ``text.lower().strip()``: NBSP, U+3000, U+2028 ... at either end go."""
    ref, _, texts = yttm_pair
    edges = ["\xa0", "\u3000", "\u2028", "\u2029", "\u205f", "\u1680", "\u2003", "\x85", "\x1c", " \xa0 "]
    texts = texts + [a + t + b for t in texts[:60] for a, b in [(edges[len(t) % 10], edges[(len(t) + 3) % 10])]]
    tok = yttm_tokenizer(yttm_model, lowercase=True, strip=True)
    want = torch.tensor([_rudalle_encode(ref, s.lower().strip(), 32) for s in texts])
    got = tok.encode(texts, 32)
    bad = [texts[i] for i in range(len(texts)) if not torch.equal(got[i], want[i])]
    assert not bad, f"{len(bad)} of {len(texts)} differ, first: {bad[0]!r}"
    unstripped = yttm_tokenizer(yttm_model, lowercase=True).encode(texts, 32)
    assert not torch.equal(unstripped, want)  # the strip is what makes them equal


@pytest.mark.parametrize("text_len", [1, 4, 16, 128])
def test_yttm_encode_is_rudalle_encode_text(yttm_pair, text_len):
    ref, tok, texts = yttm_pair
    tok.n_truncated = tok.n_encoded = 0
    got = tok.encode(texts, text_len)
    want = torch.tensor([_rudalle_encode(ref, s, text_len) for s in texts])
    assert torch.equal(got, want)
    assert tok.n_truncated == sum(len(w) + 2 > text_len for w in _ref_yttm_ids(ref, texts))
    assert tok.lengths(texts[:20]) == [len(w) + 2 for w in _ref_yttm_ids(ref, texts[:20])]
    with pytest.raises(DataError, match="wraps every text"):
        tok.encode(texts[:2], text_len, add_special=True)


def test_yttm_decode_reads_back(yttm_pair):
    ref, tok, texts = yttm_pair
    ids = tok.encode(texts, 128)
    want = ref.decode([_rudalle_encode(ref, s, 128) for s in texts], ignore_ids=[0, 2, 3])
    assert tok.decode(ids) == want
    assert tok.decode(tok.encode("ёлка  на\tстоле", 16)[0]) == "ёлка на столе"


def test_round_trip_keeps_behaviour(yttm_pair, bert_pair, tmp_path):
    ref, tok, texts = yttm_pair
    again = TextTokenizer.from_str(tok.to_str())
    assert again.fingerprint == tok.fingerprint
    assert torch.equal(again.encode(texts, 20), tok.encode(texts, 20))
    tok.save(tmp_path / "tokenizer.json")
    assert torch.equal(TextTokenizer.from_file(tmp_path / "tokenizer.json").encode(texts, 20), tok.encode(texts, 20))
    unwrapped = json.loads(tok.to_str())
    unwrapped["post_processor"] = None  # the wrap is part of the fingerprint
    assert TextTokenizer.from_str(json.dumps(unwrapped)).fingerprint != tok.fingerprint
    _, btok, btexts = bert_pair
    bagain = TextTokenizer.from_str(btok.to_str())
    assert bagain.fingerprint == btok.fingerprint
    assert torch.equal(bagain.encode(btexts, 32), btok.encode(btexts, 32))


@needs_vocab
def test_existing_tokenizers_unchanged(bert_pair):
    """Ids and fingerprints of the vocab.txt path and of hub tokenizer.json files are what they were
    before the wrap / alias support (values computed with the previous tokenizer.py)."""
    ref, _, texts = bert_pair
    ours = TextTokenizer.from_file(VOCAB)
    assert ours.fingerprint == "d5c19b505f3893e5"
    hub = TextTokenizer.from_str(ref._tokenizer.to_str())  # has a [CLS] $A [SEP] post_processor: not honoured
    assert hub.fingerprint == "040f9dca5f6eea1c"
    assert hub.encode("红色 cat", 4)[0].tolist() == _ref_bert_ids(ref, "红色 cat") + [0]
    plain = json.loads(ref._tokenizer.to_str())
    plain["post_processor"] = {"type": "TemplateProcessing", "single": [{"Sequence": {"id": "A", "type_id": 0}}],
                               "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                               "special_tokens": {}}  # "$A" alone wraps nothing: no wrap, same fingerprint
    no_pp = dict(plain, post_processor=None)
    assert TextTokenizer.from_str(json.dumps(plain)).fingerprint == TextTokenizer.from_str(json.dumps(no_pp)).fingerprint


# -- bad files ----------------------------------------------------------------------------------
def test_bad_files_raise_one_clear_error(yttm_model, tmp_path):
    raw = yttm_model.read_text()
    cases = {
        "truncated.model": raw[: len(raw) // 2],
        "corrupt.model": raw.replace("\n", "\nx", 1),
        "empty.model": "",
        "badrule.model": raw.replace("\n1 0 2 3", "\n1 0 2 99999", 1),
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=f"{name}.*YouTokenToMe"):
            yttm_tokenizer(tmp_path / name)
    (tmp_path / "binary.model").write_bytes(bytes(range(256)))
    with pytest.raises(DataError, match="binary.model.*YouTokenToMe"):
        yttm_tokenizer(tmp_path / "binary.model")
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n红\n")
    with pytest.raises(DataError, match="vocab.txt.*YouTokenToMe"):
        yttm_tokenizer(tmp_path / "vocab.txt")
    for name in ("truncated.model", "binary.model"):
        with pytest.raises(DataError, match=f"{name}.*BERT vocab.txt"):
            bert_tokenizer(tmp_path / name)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"[PAD]": 0, "[UNK]": 1}}}, indent=1))
    with pytest.raises(DataError, match="tokenizer.json.*BERT vocab.txt"):
        bert_tokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(DataError, match="missing.model"):
        yttm_tokenizer(tmp_path / "missing.model")
    # content decides between the two formats
    assert load_text_tokenizer(yttm_model).fingerprint == yttm_tokenizer(yttm_model).fingerprint
    assert load_text_tokenizer(tmp_path / "vocab.txt").vocab_size == 3
