"""Entity linking (ARTIST knowledge, issue 19): lexicon files, Aho-Corasick linking against a brute-force
reference, token spans through our tokenizers, the EasyNLP knowledge TSV, and links through shards and batches."""

from __future__ import annotations

import base64
import io
import json
import random
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import processors

from t2i.data.code_datamodule import CodesDataModule
from t2i.data.codes import CodeShardWriter, load_codes, shard_name, write_json
from t2i.data.datamodule import ImageTextDataModule
from t2i.data.formats import EasyNLPKnowledgeTSV, open_source
from t2i.data.shards import convert
from t2i.data.skips import DataError, SkipLog
from t2i.data.tokenizer import TextTokenizer
from t2i.data.wds import WebDataset
from t2i.knowledge import EntityLexicon, entity_batch

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat", "in", "new", "y", "##ork", "food", "ip",
         "##hone", "苹", "果", "手", "机", "壳", "红", "色", "的", "新", "款", "女", "装", "连", "衣", "裙", ","]


def _is_w(c: str) -> bool:
    """The documented whole-word rule: letters/digits of scripts written with spaces (before U+2E80)."""
    return c.isalnum() and ord(c) < 0x2E80


def brute_links(pairs, text, cap):
    """Reference: every substring, looked up in a dict; whole-word rule for alphabetic scripts."""
    table = {}
    for name, i in pairs:
        if len(name) >= 2:
            table.setdefault(name.lower(), i)
    t = text.lower()
    found = []
    for s in range(len(t)):
        for e in range(s + 1, len(t) + 1):
            sub = t[s:e]
            if sub not in table:
                continue
            if _is_w(sub[0]) and s > 0 and _is_w(t[s - 1]):
                continue
            if _is_w(sub[-1]) and e < len(t) and _is_w(t[e]):
                continue
            found.append((-(e - s), s, table[sub], e))
    found.sort()
    found = found if cap is None else found[:cap]
    return [(i, s, e) for _, s, i, e in found]


PAIRS = [("苹果", 7), ("苹果手机", 3), ("手机", 9), ("手机壳", 4), ("机", 5), ("红色", 11), ("连衣裙", 12),
         ("衣裙", 13), ("cat", 20), ("Cat food", 21), ("New York", 22), ("york", 23), ("ip", 24), ("APPLE", 25)]


@pytest.mark.parametrize("text", [
    "苹果手机壳", "红色的苹果手机壳,新款苹果手机", "a cat in New York", "category catalog cat's cat", "CAT FOOD for cats",
    "", "😀😀苹果\x00手机\u200b壳🍎", "newyork york", "iphone ip手机", "连衣裙连衣裙连衣裙连衣裙连衣裙连衣裙",
])
@pytest.mark.parametrize("cap", [None, 10, 2])
def test_link_equals_brute_force(text, cap):
    lex = EntityLexicon([n for n, _ in PAIRS], [i for _, i in PAIRS])
    assert lex.link(text, cap) == brute_links(PAIRS, text, cap)
    cjk = [(n, i) for n, i in PAIRS if not n.isascii()]  # link_many's fast path: no whole-word checks needed
    lex = EntityLexicon([n for n, _ in cjk], [i for _, i in cjk])
    assert lex.link_many([text, text[::-1]], cap) == [brute_links(cjk, text, cap), brute_links(cjk, text[::-1], cap)]


def test_link_hand_values_and_random_against_brute_force():
    lex = EntityLexicon([n for n, _ in PAIRS], [i for _, i in PAIRS])
    # overlaps allowed, longest first, ties leftmost; "机" (one char) is never an entity
    assert lex.link("苹果手机壳") == [(3, 0, 4), (4, 2, 5), (7, 0, 2), (9, 2, 4)]
    assert lex.link("苹果手机壳", max_entities=1) == [(3, 0, 4)]
    assert lex.link("a cat in New York") == [(22, 9, 17), (23, 13, 17), (20, 2, 5)]
    assert lex.link("category") == [] and lex.link("cat毛衣") == [(20, 0, 3)] and lex.link("") == []
    assert lex.link_many(["苹果", "??"]) == [[(7, 0, 2)], []]
    rng = random.Random(0)
    alphabet = list("苹果手机壳ab c")
    for _ in range(30):
        pairs = [("".join(rng.choices(alphabet, k=rng.randint(1, 5))), rng.randrange(1000)) for _ in range(40)]
        lex = EntityLexicon([n for n, _ in pairs], [i for _, i in pairs])
        for _ in range(20):
            text = "".join(rng.choices(alphabet + ["X", "é"], k=rng.randint(0, 30)))
            for cap in (None, 10, 3):
                assert lex.link(text, cap) == brute_links(pairs, text, cap), (pairs, text, cap)


def test_entity2id_and_plain_files(tmp_path):
    f = tmp_path / "entity2id.txt"
    f.write_text("5\n苹果\t0\n机\t1\n手机\t4\nNew York\t2\n苹果\t3\n", encoding="utf-8")
    lex = EntityLexicon.from_file(f)
    assert lex.names == ["苹果", "手机", "New York"] and lex.ids == [0, 4, 2]  # header skipped, 1-char dropped
    assert lex.num_ids == 5 and len(lex) == 3  # num_ids counts the dropped entity's row too
    plain = tmp_path / "plain.txt"
    plain.write_text("苹果\n\n手机\nx\ncat food\n", encoding="utf-8")
    p = EntityLexicon.from_file(plain)
    assert p.names == ["苹果", "手机", "cat food"] and p.ids == [0, 2, 4] and p.num_ids == 5
    back = EntityLexicon.from_str(lex.to_str())
    assert back.fingerprint == lex.fingerprint and back.link("New York苹果") == lex.link("New York苹果")
    assert p.fingerprint != lex.fingerprint
    bad = tmp_path / "bad.txt"
    bad.write_text("3\n苹果\t0\n手机\tx1\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        EntityLexicon.from_file(bad)
    msg = str(e.value)
    assert "\n" not in msg and f"{bad}:3" in msg and "knowledge.lexicon" in msg
    with pytest.raises(DataError, match="not found|does not exist|no such"):
        EntityLexicon.from_file(tmp_path / "missing.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataError, match="UTF-8"):
        EntityLexicon.from_file(tmp_path / "bin.txt")
    with pytest.raises(DataError, match="stored entity lexicon"):
        EntityLexicon.from_str("{}")


@pytest.fixture
def vocab_path(tmp_path):
    p = tmp_path / "vocab.txt"
    p.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return p


def wrapped(tok: TextTokenizer) -> TextTokenizer:
    """The same vocabulary with a ruDALL-E-style single-text wrap (<BOS> = [CLS], <EOS> = [SEP])."""
    t = tok.tok
    t.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="$A $B",
                                                     special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return TextTokenizer(t)


def test_offsets_align_with_encode(vocab_path):
    tok = TextTokenizer.from_file(vocab_path)
    texts = ["A cat in New York", "红色的苹果手机壳", "", "ipHone 手机"]
    for text_len in (4, 8, 32):
        ids = tok.encode(texts, text_len)
        offs = tok.offsets(texts, text_len)
        for row, text, off in zip(ids.tolist(), texts, offs):
            assert len(off) == sum(i != tok.pad_id for i in row)
            for i, (a, b) in zip(row, off):
                assert tok.tok.id_to_token(i).removeprefix("##") == text[a:b].lower()
    assert tok.offsets("A cat in New York", 32)[0] == [(0, 1), (2, 5), (6, 8), (9, 12), (13, 14), (14, 17)]
    assert tok.offsets("A cat", 4, add_special=True)[0] == [(0, 0), (0, 1), (2, 5), (0, 0)]
    wrap = wrapped(TextTokenizer.from_file(vocab_path))
    assert wrap.encode("A cat", 8)[0, :4].tolist() == [2, 5, 6, 3]
    assert wrap.offsets("A cat", 8)[0] == [(0, 0), (0, 1), (2, 5), (0, 0)]
    assert wrap.offsets("A cat in New York", 4)[0] == [(0, 0), (0, 1), (2, 5), (6, 8)]  # cut: <EOS> lost


def test_entity_batch_token_spans(vocab_path):
    lex = EntityLexicon([n for n, _ in PAIRS], [i for _, i in PAIRS])
    tok = TextTokenizer.from_file(vocab_path)
    texts = ["A cat in New York", "红色的苹果手机壳", "装", "ipHone 手机"]
    links = lex.link_many(texts)
    ids, spans = entity_batch(links, tok.offsets(texts, 32), 32, 4)
    assert ids.tolist() == [[22, 23, 20, -1], [3, 4, 11, 7], [-1] * 4, [9, -1, -1, -1]]
    assert spans.tolist() == [
        [[3, 6], [4, 6], [1, 2], [0, 0]],  # New York = new y ##ork; york = y ##ork
        [[3, 7], [5, 8], [0, 2], [3, 5]],  # one token per CJK char
        [[0, 0]] * 4,
        [[2, 4], [0, 0], [0, 0], [0, 0]],  # "ip" is not a whole word of "ipHone"; ip ##hone 手 机
    ]
    # cut at 5 tokens: New York (tokens 3-5) and york are dropped, cat stays; the Chinese row keeps what fits
    ids, spans = entity_batch(links, tok.offsets(texts, 5), 5, 10)
    assert ids[0].tolist() == [20] + [-1] * 9 and spans[0, 0].tolist() == [1, 2]
    assert ids[1, :3].tolist() == [11, 7, -1] and spans[1, :2].tolist() == [[0, 2], [3, 5]]
    # a wrap shifts every span by its <BOS>
    wrap = wrapped(TextTokenizer.from_file(vocab_path))
    ids_w, spans_w = entity_batch(links, wrap.offsets(texts, 32), 32, 4)
    ids0, spans0 = entity_batch(links, tok.offsets(texts, 32), 32, 4)
    assert torch.equal(ids_w, ids0) and torch.equal(spans_w, torch.where(ids0[..., None] >= 0, spans0 + 1, 0))


def png_b64(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 10), colour).save(buf, format="PNG")
    return base64.urlsafe_b64encode(buf.getvalue())


def easynlp_knowledge_line(idx, text, tokens, links, image=True) -> bytes:
    """A line as EasyNLP's preprocess_data_knowl.py writes it (entity ids and token positions given)."""
    n = len(tokens)
    lex = " ".join(str(i) for i, _, _ in links)
    pos_s = " ".join(str(x) for x in list(range(n)) + [s for _, s, _ in links])
    pos_e = " ".join(str(x) for x in list(range(n)) + [e for _, _, e in links])
    cols = [idx, text, lex, pos_s, pos_e, str(n)]
    line = "\t".join(cols).encode("utf-8")
    return line + (b"\t" + png_b64((200, 0, 0)) if image else b"") + b"\n"


def test_easynlp_knowledge_tsv_round_trip(tmp_path, vocab_path):
    f = tmp_path / "knowl.tsv"
    rows = [
        easynlp_knowledge_line("1", "红色苹果手机壳", list("红色苹果手机壳"), [(11, 0, 1), (7, 2, 3), (3, 2, 5), (4, 4, 6)]),
        easynlp_knowledge_line("2", "连衣裙", list("连衣裙"), []),
        easynlp_knowledge_line("3", "iphone 手机壳", ["iphone", "手", "机", "壳"], [(9, 1, 2)]),
        easynlp_knowledge_line("4", "手机", list("手机"), [(9, 0, 1)]).replace(b"\t2\t", b"\t5\t"),  # token_len
        easynlp_knowledge_line("5", "手机", list("手机"), [(9, 0, 2)]),  # position past the caption
        easynlp_knowledge_line("6", "手机", list("手机"), [(9, 0, 1)]).replace(b"\t9\t", b"\tx\t"),  # id
        b"7\tonly two columns\n",
    ]
    f.write_bytes(b"".join(rows))
    log = SkipLog(1.0)
    src = open_source("easynlp_knowledge_tsv", str(f))
    recs = src.records(log)
    assert [r.key for r in recs] == ["1", "2", "3"]
    assert recs[0].links == [[(11, 0, 2), (7, 2, 4), (3, 2, 6), (4, 4, 7)]]  # file order, char spans
    assert recs[1].links == [[]] and recs[2].links == [[(9, 7, 9)]]
    assert dict(log.by_reason) == {"bad_links": 3, "bad_columns": 1}
    assert src.load(recs[0]).size == (12, 10)
    # with EasyNLP's vocab, "iphone" is two word pieces: the positions shift, the char spans do not
    f2 = tmp_path / "knowl2.tsv"
    f2.write_bytes(easynlp_knowledge_line("3", "iphone 手机壳", ["ip", "##hone", "手", "机", "壳"], [(9, 2, 3)]))
    recs2 = EasyNLPKnowledgeTSV(f2, bert_vocab=str(vocab_path)).records(SkipLog(1.0))
    assert recs2[0].links == [[(9, 7, 9)]]
    assert EasyNLPKnowledgeTSV(f2).records(log2 := SkipLog(1.0)) == [] and log2.by_reason["bad_links"] == 1
    caps = tmp_path / "caps.tsv"
    caps.write_bytes(easynlp_knowledge_line("1", "手机", list("手机"), [(9, 0, 1)], image=False))
    with pytest.raises(DataError, match="no image column"):
        EasyNLPKnowledgeTSV(caps).records(SkipLog(1.0))
    assert EasyNLPKnowledgeTSV(caps, require_images=False).read_captions() == [("1", "手机")]


CAPTIONS = ["红色的苹果手机壳", "新款女装连衣裙", "手机", "红色连衣裙,苹果"]


def write_plain_tsv(path):
    path.write_bytes(b"".join(f"{i}\t{c}\t".encode() + png_b64((10 * i, 0, 0)) + b"\n"
                              for i, c in enumerate(CAPTIONS)))
    return path


def test_convert_shards_and_batches_carry_links(tmp_path, vocab_path):
    lexfile = tmp_path / "entity2id.txt"
    lexfile.write_text("9\n" + "".join(f"{n}\t{i}\n" for n, i in PAIRS), encoding="utf-8")
    lex = EntityLexicon.from_file(lexfile)
    tsv = write_plain_tsv(tmp_path / "t.tsv")
    out = tmp_path / "shards"
    convert(open_source("easynlp_tsv", str(tsv)), out, lexicon=lex, max_entities=3, progress=False)
    with tarfile.open(next(out.glob("*.tar"))) as tar:
        meta = json.loads(tar.extractfile("0.json").read())
    assert meta["links"] == [[list(x) for x in lex.link(CAPTIONS[0], 3)]]
    recs = WebDataset(str(out)).records(SkipLog(1.0))
    assert [r.links for r in recs] == [[lex.link(c, 3)] for c in CAPTIONS]

    tok = TextTokenizer.from_file(vocab_path)
    want = entity_batch([lex.link(c, 3) for c in CAPTIONS], tok.offsets(CAPTIONS, 8), 8, 10)

    def val_batch(**kw):
        dm = ImageTextDataModule(tokenizer=str(vocab_path), image_size=8, text_len=8, batch_size=4, num_workers=0,
                                 **kw)
        dm.setup("fit")
        return next(iter(dm.val_dataloader()))

    stored = val_batch(source="wds", train=str(out), val=str(out))  # stored links: no knowledge config needed
    assert stored["entities"].shape == (4, 10) and stored["entity_spans"].shape == (4, 10, 2)
    assert torch.equal(stored["entities"], want[0]) and torch.equal(stored["entity_spans"], want[1])
    fly = val_batch(source="easynlp_tsv", train=str(tsv), val=str(tsv),
                    knowledge={"lexicon": str(lexfile), "max_entities": 3})
    assert fly["entities"].shape == (4, 3)
    assert torch.equal(fly["entities"], want[0][:, :3]) and torch.equal(fly["entity_spans"], want[1][:, :3])
    plain = val_batch(source="easynlp_tsv", train=str(tsv), val=str(tsv))
    assert "entities" not in plain and "entity_spans" not in plain
    assert set(plain) == {"caption", "key", "image", "text", "skipped", "n_truncated"}
    off = val_batch(source="easynlp_tsv", train=str(tsv), val=str(tsv), knowledge={"lexicon": None})
    assert set(off) == set(plain)
    # the knowledge TSV's own links reach the batch
    knowl = tmp_path / "k.tsv"
    knowl.write_bytes(easynlp_knowledge_line("1", "红色苹果手机壳", list("红色苹果手机壳"), [(3, 2, 5), (11, 0, 1)]))
    kb = val_batch(source="easynlp_knowledge_tsv", train=str(knowl), val=str(knowl))
    assert kb["entities"][0, :3].tolist() == [3, 11, -1] and kb["entity_spans"][0, :2].tolist() == [[2, 6], [0, 2]]


def test_code_shards_carry_links(tmp_path, vocab_path):
    tok = TextTokenizer.from_file(vocab_path)
    lex = EntityLexicon([n for n, _ in PAIRS], [i for _, i in PAIRS])
    grids = np.arange(4 * 4, dtype=np.int64).reshape(4, 2, 2)
    w = CodeShardWriter(tmp_path / shard_name("train", 0, 0), "int16")
    for i, c in enumerate(CAPTIONS):
        w.write(f"k{i}", grids[i], [c], links=[lex.link(c)] if i != 2 else None)
    name = w.close().name
    write_json(tmp_path / "manifest.json", {"version": 1, "count": {"train": 4}, "shards": {"train": [name]},
                                            "grid": [2, 2], "codebook_size": 16, "downsample": 4, "image_size": 8,
                                            "dtype": "int16"})
    links: list = []
    keys, _, _ = load_codes(tmp_path, "train", links=links)
    assert links == [[lex.link(CAPTIONS[0])], [lex.link(CAPTIONS[1])], None, [lex.link(CAPTIONS[3])]]
    assert len(load_codes(tmp_path, "train")) == 3  # the 3-tuple is unchanged
    dm = CodesDataModule(str(tmp_path), tokenizer=str(vocab_path), text_len=8, batch_size=4, val_fraction=0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    order = [keys.index(k) for k in batch["key"]]
    want = [lex.link(CAPTIONS[i]) if i != 2 else [] for i in order]
    ids, spans = entity_batch(want, tok.offsets([CAPTIONS[i] for i in order], 8), 8, 10)
    assert torch.equal(batch["entities"], ids) and torch.equal(batch["entity_spans"], spans)
    # the same codes with a lexicon link the caption without stored links on the fly
    dm = CodesDataModule(str(tmp_path), tokenizer=str(vocab_path), text_len=8, batch_size=4, val_fraction=0,
                         knowledge={"lexicon": None, "max_entities": 10})
    dm.setup("fit")
    assert dm.knowledge is not None and dm.knowledge.lexicon is None


def test_t2i_data_convert_with_lexicon(tmp_path):
    from t2i.cli.data import run
    from tests.test_cli_data import data_cfg

    lexfile = tmp_path / "entity2id.txt"
    lexfile.write_text("9\n" + "".join(f"{n}\t{i}\n" for n, i in PAIRS), encoding="utf-8")
    knowl = tmp_path / "k.tsv"
    knowl.write_bytes(easynlp_knowledge_line("1", "红色苹果手机壳", list("红色苹果手机壳"), [(3, 2, 5), (11, 0, 1)]))
    for lexicon, want in ((None, [[3, 2, 6], [11, 0, 2]]), (lexfile, [[3, 2, 6], [4, 4, 7]])):
        out = tmp_path / f"shards_{lexicon is None}"
        extra = [f"knowledge.lexicon={lexicon}", "knowledge.max_entities=2"] if lexicon else []
        run(data_cfg(tmp_path, "command=convert", "source=easynlp_knowledge_tsv", f"input={knowl}",
                     f"output={out}", *extra))
        recs = WebDataset(str(out)).records(SkipLog(1.0))
        assert [list(map(list, r.links[0])) for r in recs] == [want]  # the TSV's links, or re-linked


def test_bert_word_spans_count_like_bert_tokenizer(tmp_path):
    """With a vocab of specials only, transformers' BertTokenizer makes one [UNK] per basic token: the
    reader's fallback must find the same tokens (positions in EasyNLP's TSV count them)."""
    from transformers import BertTokenizer

    from t2i.data.formats import bert_word_spans

    (tmp_path / "v.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n", encoding="utf-8")
    bt = BertTokenizer(str(tmp_path / "v.txt"), do_lower_case=True)
    texts = ["ab\x00cd 手机,iPhone\u3000x", "夏季新款 韩版T恤女 100%纯棉!", "café\u0301 naïve\x1fok", "",
             "a\u200bb \ufffd c", "【包邮】女装(2024款)…"]
    for t in texts:
        assert len(bert_word_spans(t)) == len(bt.tokenize(t)), t
    assert [texts[1][a:b] for a, b in bert_word_spans(texts[1])][7:10] == ["恤", "女", "100"]
