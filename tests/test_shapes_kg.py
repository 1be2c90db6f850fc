"""Shapes-KG (issue 19): a deterministic made-up world whose held-out objects appear in no training caption
and share no character with the seen ones; every object's colour and shape are in the triples; captions
parse back to their specs and the oracle reads the written images as their specs; t2i-eval eval=shapes_kg
links prompts with the checkpoint's lexicon and scores exactly what a redraw with the same seeds and
entities gives."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from t2i.data import shapes as S
from t2i.data import shapes_kg as K


def all_names(world: K.World) -> list[str]:
    return world.entities()


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_world_is_deterministic_with_clean_names(lang):
    w = K.make_world(0, 3, 1, lang)
    assert w.to_dict() == K.make_world(0, 3, 1, lang).to_dict()
    assert [o.name for o in K.make_world(1, 3, 1, lang).objects] != [o.name for o in w.objects]
    assert len(w.seen) == 72 and len(w.heldout) == 24
    for c in S.COLORS:
        for s in S.SHAPES:
            assert len(w.of_pair(c, s, False)) == 3 and len(w.of_pair(c, s, True)) == 1
    names = all_names(w)
    assert len(set(names)) == len(names) == 96 + 6 + 4 + 10
    for a in names:
        assert len(a) >= 2
        for b in names:
            assert a == b or a not in b, (a, b)
    seen_chars = set("".join(o.name for o in w.seen))
    held_chars = set("".join(o.name for o in w.heldout))
    assert not seen_chars & held_chars
    if lang == "zh":  # no object character occurs in a Shapes caption or its parser's keys
        assert not (seen_chars | held_chars) & set(K.shapes_caption_text("zh"))
    else:
        assert not {o.name for o in w.objects} & set(K.shapes_caption_text("en").split())


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    from t2i.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("skg")
    paths = K.write_shapes_kg(out, n_train=160, n_val=16, n_test=40, n_kg_heldout=40, image_size=32, progress=False)
    train_tokenizer([paths[f"{s}_tsv"] for s in K.SPLITS] + [paths["object_names"]], out / "tokenizer.json",
                    vocab_size=300)
    return out, paths


def records(paths, split):
    return [json.loads(line) for line in paths[f"{split}_jsonl"].read_text(encoding="utf-8").splitlines()]


def test_written_files_are_deterministic(bench, tmp_path):
    out, paths = bench
    again = K.write_shapes_kg(tmp_path, n_train=160, n_val=16, n_test=40, n_kg_heldout=40, image_size=32,
                              progress=False)
    for key, p in paths.items():
        assert again[key].read_bytes() == p.read_bytes(), key
    meta = json.loads(paths["meta"].read_text(encoding="utf-8"))
    world = K.world_from_meta(paths["meta"])
    assert world.to_dict() == K.make_world(0, 3, 1, "zh").to_dict()
    assert meta["heldout_objects"] == [o.name for o in world.heldout]


def test_heldout_objects_only_in_kg_heldout_and_triples(bench):
    out, paths = bench
    world = K.world_from_meta(paths["meta"])
    held = {o.name for o in world.heldout}
    held_chars = set("".join(held))
    train = records(paths, "train")
    named = [r for r in train if r["object"] is not None]
    assert 0.35 < len(named) / len(train) < 0.65  # object_fraction 0.5
    for split in ("train", "val", "test"):
        for r in records(paths, split):
            assert r["object"] is None or r["object"] in world.by_name and r["object"] not in held
            for c in r["captions"]:
                assert not held_chars & set(c), (split, c)  # not even one character of a held-out name
    tsv_captions = [line.split("\t")[1] for s in ("train", "val", "test")
                    for line in paths[f"{s}_tsv"].read_text(encoding="utf-8").splitlines()]
    assert not held_chars & set("".join(tsv_captions))
    for split in ("val", "test", "kg_heldout"):
        assert all(r["object"] is not None and (r["object"] in held) == (split == "kg_heldout")
                   for r in records(paths, split))
    triples = [tuple(line.split("\t")) for line in paths["triples"].read_text(encoding="utf-8").splitlines()]
    lines = paths["entity2id"].read_text(encoding="utf-8").splitlines()
    assert int(lines[0]) == len(lines) - 1
    ids = dict(line.split("\t") for line in lines[1:])
    assert sorted(int(i) for i in ids.values()) == list(range(len(ids)))
    for o in world.objects:
        facts = {r: t for h, r, t in triples if h == o.name}
        assert facts["颜色"] == S.ZH["color"][o.color] and facts["形状"] == S.ZH["shape"][o.shape]
        assert facts["产地"] in K.DISTRACTORS["zh"]["origin"] and facts["类别"] in K.DISTRACTORS["zh"]["category"]
        assert len([1 for h, _, _ in triples if h == o.name]) == 4
    assert {h for h, _, _ in triples} | {t for _, _, t in triples} <= set(ids)


def test_captions_parse_back_and_the_oracle_reads_the_images(bench):
    from t2i.cli.data import check_oracle

    out, paths = bench
    world = K.world_from_meta(paths["meta"])
    for split in K.SPLITS:
        for r in records(paths, split):
            spec = S.ShapeSpec.from_dict(r["spec"])
            assert [K.parse_kg_caption(c, world) for c in r["captions"]] == [spec] * len(r["captions"])
            if r["object"]:
                o = world.by_name[r["object"]]
                assert (o.color, o.shape) == (spec.color, spec.shape)
    assert K.parse_kg_caption("一个大的" + world.seen[0].name + world.seen[1].name + "在左上角", world) is None
    for split in ("test", "kg_heldout"):
        assert check_oracle(out, split, prefix=K.PREFIX)["all"] == 1.0
    en = K.make_world(0, 3, 1, "en")
    for s in K.make_split("kg_heldout", 8, en):
        assert all(K.parse_kg_caption(c, en) == s.spec for c in s.captions)


def test_link_prompts_finds_the_object_and_its_tokens(bench):
    from t2i.data.tokenizer import TextTokenizer
    from t2i.knowledge.lexicon import EntityLexicon
    from t2i.knowledge.prompts import link_prompts

    out, paths = bench
    world = K.world_from_meta(paths["meta"])
    lex = EntityLexicon.from_file(paths["entity2id"])
    tok = TextTokenizer.from_file(out / "tokenizer.json")
    ids_of = {e: i for i, e in enumerate(world.entities())}
    held = world.heldout[0]
    prompts = [f"一个大的{held.name}在左上角", "左下角有一个小的红色圆形", f"{world.seen[5].name}"]
    assert not tok.unknown(prompts[0])  # the tokenizer knows the held-out characters
    ids, spans = link_prompts(lex, tok, prompts, text_len=12, max_entities=3)
    assert ids.tolist() == [[ids_of[held.name], -1, -1], [ids_of["红色"], ids_of["圆形"], -1],
                            [ids_of[world.seen[5].name], -1, -1]]
    # one token per CJK character: the name is characters 4..5 of prompt 0 and 0..1 of prompt 2
    assert spans[0, 0].tolist() == [4, 6] and spans[2, 0].tolist() == [0, 2]
    assert spans[1, :2].tolist() == [[8, 10], [10, 12]]
    assert link_prompts(lex, tok, prompts, text_len=5, max_entities=3)[0][0].tolist() == [-1, -1, -1]  # cut


# -- t2i-eval eval=shapes_kg on a tiny random model ------------------------------------------------
PALETTE = [(255, 255, 255), *S.COLORS.values(), (255, 255, 255)]


class PaletteTokenizer(nn.Module):
    """Code c -> an 8x8 block of palette colour c (white, the six Shapes colours, white): a decoder the
    oracle can read something from, rebuildable from the checkpoint's record."""

    def __init__(self, block: int = 8):
        super().__init__()
        self.config = {"block": block}
        self.codebook_size, self.downsample = len(PALETTE), block
        self.register_buffer("palette", torch.tensor(PALETTE, dtype=torch.float32) / 127.5 - 1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        x = self.palette[codes].permute(0, 3, 1, 2)
        return x.repeat_interleave(self.downsample, 2).repeat_interleave(self.downsample, 3)


@pytest.fixture(scope="module")
def kg_ckpt(bench):
    """A transformer with an open knowledge gate and random entity vectors, saved as t2i-train would."""
    from t2i.data.tokenizer import TextTokenizer
    from t2i.knowledge.lexicon import EntityLexicon
    from t2i.lit.transformer import LEXICON_KEY
    from t2i.pretrained.export import transformer_checkpoint

    out, paths = bench
    lex = EntityLexicon.from_file(paths["entity2id"])
    tok = TextTokenizer.from_file(out / "tokenizer.json")
    know = {"num_entities": lex.num_ids, "dim": 6, "trainable": False, "fusion": "input"}
    config = {"text_vocab": tok.vocab_size, "text_len": 12, "text_pad_id": tok.pad_id, "image_vocab": len(PALETTE),
              "image_grid": [3, 3], "n_layer": 1, "n_head": 2, "d_model": 16, "attention": "full", "knowledge": know}
    from t2i.models.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(**config)
    with torch.no_grad():
        model.knowledge.table.normal_(0, 3.0)
        model.knowledge.proj.weight.normal_(0, 1.0)
        model.knowledge.gate.fill_(1.5)
    plain = {k: v for k, v in model.state_dict().items() if not k.startswith("knowledge.")}
    ckpt = transformer_checkpoint({k: v for k, v in config.items() if k != "knowledge"}, plain, tok,
                                  PaletteTokenizer(), "test")
    ckpt["hyper_parameters"]["model"] = config  # then the knowledge layer, as t2i-train saves it
    ckpt["hyper_parameters"]["knowledge"] = {"enabled": True, "max_entities": 4}
    ckpt["state_dict"] = {f"model.{k}": v for k, v in model.state_dict().items()}
    ckpt[LEXICON_KEY] = lex.to_str()
    path = out / "kg.ckpt"
    torch.save(ckpt, path)
    return path, model.eval(), tok, lex


def test_t2i_eval_shapes_kg_links_prompts_and_scores_the_redraw(bench, kg_ckpt, tmp_path, monkeypatch):
    import t2i.sampling
    from t2i.cli.evaluate import run
    from t2i.data.oracle import score
    from t2i.eval.generation import draw
    from t2i.knowledge.prompts import link_prompts
    from t2i.metrics.scores import to_uint8
    from tests.test_eval import eval_cfg

    path, model, tok, lex = kg_ckpt
    seen = []
    real_generate = t2i.sampling.generate

    def spy(*a, **kw):
        seen.append(kw.get("entities"))
        return real_generate(*a, **kw)

    monkeypatch.setattr(t2i.sampling, "generate", spy)
    args = ["eval=shapes_kg", f"ckpt={path}", "eval.num_captions=6", "eval.num_candidates=2", "batch_size=4",
            "metrics.extractor=null", "metrics.inception_score=false", "metrics.cache_dir=null"]
    result = run(eval_cfg(tmp_path, *args))
    monkeypatch.setattr(t2i.sampling, "generate", real_generate)
    assert result["protocol"]["knowledge"] == {"lexicon": lex.fingerprint, "entities": len(lex), "max_entities": 4}
    assert len(seen) == 4 and all(e is not None for e in seen)  # 2 splits x 2 batches, each linked
    world = K.make_world(0, 3, 1, "zh")
    ids_of = {e: i for i, e in enumerate(world.entities())}
    k = 0
    for split in ("test", "kg_heldout"):
        samples = K.make_split(split, 6, world, seed=1, image_size=24)
        firsts = []
        for start in (0, 4):
            caps = [s.caption for s in samples[start:start + 4]]
            ents = link_prompts(lex, tok, caps, 12, 4)
            assert torch.equal(seen[k][0], ents[0]) and torch.equal(seen[k][1], ents[1])
            assert ents[0][:, 0].tolist() == [ids_of[s.object] for s in samples[start:start + 4]]
            k += 1
            kw = dict(top_k=None, top_p=None, temperature=1.0, cfg_scale=None, use_cache=True)
            drawn = draw(model, PaletteTokenizer(), tok.encode(caps, 12), caps, 2, None,
                         torch.Generator().manual_seed(start), entities=ents, **kw)
            with torch.no_grad():  # the entities reach the logits (the open gate): linking is not a no-op
                text, prefix = tok.encode(caps, 12), torch.zeros(len(caps), 3, dtype=torch.long)
                delta = model.image_logits_uncached(text, prefix, ents) - model.image_logits_uncached(text, prefix)
            assert delta.abs().amax(1).min() > 1e-4
            firsts.append(drawn.candidates[:, 0])
        images = to_uint8(torch.cat(firsts)).permute(0, 2, 3, 1).numpy()
        want = score(images, [s.spec for s in samples])
        got = result["splits"][split]["acc_first"]
        assert got == pytest.approx({a: v for a, v in want.items() if a != "n"})
    assert {"acc_first", "acc_kg_heldout_first"} <= set(result["summary"])


def test_t2i_generate_links_prompts_with_the_checkpoint_lexicon(bench, kg_ckpt, tmp_path, monkeypatch):
    import t2i.sampling
    from t2i.cli.generate import run
    from t2i.errors import T2IError
    from t2i.knowledge.prompts import checkpoint_linker, link_prompts
    from tests.test_generate import generate_cfg

    path, model, tok, lex = kg_ckpt
    world = K.make_world(0, 3, 1, "zh")
    prompts = [f"一个大的{world.heldout[3].name}在左上角", "左下角有一个小的红色圆形", f"右侧有一个小的{world.seen[7].name}"]
    seen, real_generate = [], t2i.sampling.generate

    def spy(*a, **kw):
        seen.append(kw.get("entities"))
        return real_generate(*a, **kw)

    monkeypatch.setattr(t2i.sampling, "generate", spy)
    out = run(generate_cfg(tmp_path, f"ckpt={path}", f"prompts={json.dumps(prompts, ensure_ascii=False)}",
                           "num_samples=2", "batch_size=4", "cfg_scale=2.0", "device=cpu"))
    assert out["count"] == 6 and len(seen) == 2  # 2 prompts a batch
    want = link_prompts(lex, tok, prompts, 12, 4)
    assert torch.equal(torch.cat([e[0] for e in seen]), want[0]) and torch.equal(torch.cat([e[1] for e in seen]), want[1])
    assert (want[0] >= 0).sum(1).tolist() == [1, 2, 1]
    ckpt = torch.load(path, weights_only=True)
    plain = type("Plain", (), {"knowledge": None, "text_len": 12})()
    assert checkpoint_linker(ckpt, plain, tok) is None  # a model without knowledge links nothing
    ckpt.pop("t2i_entity_lexicon")
    with pytest.raises(T2IError, match="carries no entity lexicon"):
        checkpoint_linker(ckpt, model, tok)
