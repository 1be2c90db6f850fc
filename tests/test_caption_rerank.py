"""Caption-likelihood reranking (issue 20, item 3): the scores are the model's caption_logprob on the drawn
codes, the chosen candidate is their argmax, rank_sum / zsum on hand-made scores, clear errors, and
t2i-generate / t2i-eval eval=shapes running with rerank.backend=caption (and combined with a CLIP) on tiny
checkpoints with random weights."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from torch import nn

from t2i.errors import ConfigError
from t2i.models.transformer import Transformer
from t2i.pipeline.caption_rerank import (
    accuracy_by_ranking,
    caption_scores,
    check_captioning,
    check_combine,
    rank_candidates,
    ranks,
    zscores,
)
from t2i.sampling import generate

SIDE, BLOCK = 3, 8
COLORS = [(255, 255, 255), (220, 40, 40), (40, 160, 60), (40, 80, 220), (240, 200, 40), (150, 60, 200),
          (250, 140, 30), (0, 0, 0)]


class BlockTokenizer(nn.Module):
    """Code c -> an 8x8 block of colour c: a decoder small enough for tests, rebuilt from its record."""

    def __init__(self, block: int = BLOCK):
        super().__init__()
        self.config = {"block": block}
        self.codebook_size, self.downsample = len(COLORS), block
        self.register_buffer("colors", torch.tensor(COLORS, dtype=torch.float32) / 127.5 - 1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        x = self.colors[codes].permute(0, 3, 1, 2)
        return x.repeat_interleave(self.downsample, 2).repeat_interleave(self.downsample, 3)


def shapes_captions(n=24):
    from t2i.data.shapes import make_split

    return [s.caption for s in make_split("train", n, seed=3, image_size=24, lang="zh")]


@pytest.fixture(scope="module")
def tok():
    from t2i.data.tokenizer import TextTokenizer

    return TextTokenizer.train(shapes_captions(200), vocab_size=200)


def config(tok, captioning=True) -> dict:
    return {"text_vocab": tok.vocab_size, "text_len": 18, "text_pad_id": tok.pad_id, "image_vocab": len(COLORS),
            "image_grid": [SIDE, SIDE], "n_layer": 2, "n_head": 2, "d_model": 32, "attention": "full",
            "captioning": captioning}


def tiny_model(tok, captioning=True, seed=0) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(**config(tok, captioning))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # spread the logits: candidates differ, scores are not ties
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return m.eval()


@pytest.fixture(scope="module")
def ckpts(tok, tmp_path_factory):
    """A captioning transformer checkpoint, one without the direction, and a tiny random CLIP, as files."""
    from t2i.models.clip import CLIP
    from t2i.pretrained.export import transformer_checkpoint

    out = tmp_path_factory.mktemp("caption_rerank")
    paths = {}
    for name, cap in (("cap", True), ("plain", False)):
        model = tiny_model(tok, cap)
        ck = transformer_checkpoint(config(tok, cap), model.state_dict(), tok, BlockTokenizer(), "test")
        torch.save(ck, out / f"{name}.ckpt")
        paths[name] = out / f"{name}.ckpt"
    torch.manual_seed(5)
    hp = dict(vocab_size=tok.vocab_size, text_len=18, pad_id=tok.pad_id, image_size=SIDE * BLOCK, embed_dim=16,
              patch_size=4, vision_width=16, vision_layers=1, vision_heads=2, text_width=16, text_layers=1,
              text_heads=2)
    clip = CLIP(**hp)
    torch.save({"hyper_parameters": {"_target_": "t2i.lit.clip.CLIPModule", "model": hp},
                "state_dict": {f"model.{k}": v for k, v in clip.state_dict().items()},
                "datamodule": {"tokenizer": tok.to_str()}}, out / "clip.ckpt")
    paths["clip"] = out / "clip.ckpt"
    return paths


SAMPLE = dict(top_k=None, top_p=None, temperature=1.0, cfg_scale=None, use_cache=True)


# -- scores and rankings --------------------------------------------------------------------------------
def test_caption_scores_equal_caption_logprob_and_draw_chooses_the_argmax(tok):
    from t2i.eval.generation import draw

    model = tiny_model(tok)
    caps = shapes_captions(3)
    text = tok.encode(caps, 18)
    codes = generate(model, text, 4, generator=torch.Generator().manual_seed(7), **SAMPLE)
    direct = model.caption_logprob(codes, text.repeat_interleave(4, 0))
    assert torch.allclose(caption_scores(model, codes, text.repeat_interleave(4, 0), batch_size=5), direct, atol=1e-6)
    out = draw(model, BlockTokenizer(), text, caps, 4, None, torch.Generator().manual_seed(7), rerank="caption",
               **SAMPLE)
    assert torch.allclose(out.caption_scores, direct.view(3, 4), atol=1e-6)
    assert out.caption_scores.std(1).min() > 0  # the candidates differ: the choice means something
    assert torch.equal(out.chosen, direct.view(3, 4).argmax(1))
    want = BlockTokenizer().decode(codes).view(3, 4, 3, 24, 24)[torch.arange(3), out.chosen]
    assert torch.equal(out.images, want) and out.scores is None


def test_ranks_rank_sum_and_zsum_on_hand_made_scores():
    clip = torch.tensor([[0.9, 0.1, 0.5, 0.3]])
    cap = torch.tensor([[-1.0, -3.0, -0.5, -2.0]])
    assert ranks(clip).tolist() == [[0, 3, 1, 2]] and ranks(cap).tolist() == [[1, 3, 0, 2]]
    assert ranks(torch.tensor([[1.0, 2.0, 1.0]])).tolist() == [[1, 0, 2]]  # equal scores: the earlier first
    order, combined = rank_candidates(clip, cap, "rank_sum")
    assert combined.tolist() == [[1, 6, 1, 4]]
    assert order.tolist() == [[0, 2, 3, 1]]  # 0 and 2 tie at 1: CLIP's better rank (0) wins
    order, combined = rank_candidates(clip, cap, "zsum")
    zc = [(v - statistics.fmean(clip[0].tolist())) / statistics.pstdev(clip[0].tolist()) for v in clip[0].tolist()]
    zt = [(v - statistics.fmean(cap[0].tolist())) / statistics.pstdev(cap[0].tolist()) for v in cap[0].tolist()]
    want = [a + b for a, b in zip(zc, zt)]
    assert combined[0].tolist() == pytest.approx(want, rel=1e-6)
    assert order[0].tolist() == sorted(range(4), key=lambda j: -want[j])
    # zsum weighs the margins, rank_sum only the order: here they disagree
    clip2, cap2 = torch.tensor([[0.0, 1.0, 0.9]]), torch.tensor([[10.0, 0.0, 9.0]])  # ranks [2,0,1] / [0,2,1]
    assert rank_candidates(clip2, cap2, "rank_sum")[0].tolist() == [[1, 2, 0]]  # all sums 2: CLIP's order
    assert rank_candidates(clip2, cap2, "zsum")[0][0, 0] == 2  # z sums -0.54, -0.51, 1.10
    # equal rows give zero z-scores; zsum ties go to CLIP's order
    assert zscores(torch.ones(1, 3)).abs().max() == 0
    assert rank_candidates(torch.tensor([[0.1, 0.3, 0.2]]), torch.ones(1, 3), "zsum")[0].tolist() == [[1, 2, 0]]
    # single scorers: highest first
    assert rank_candidates(clip)[0].tolist() == [[0, 2, 3, 1]] and rank_candidates(None, cap)[0].tolist() == [[2, 0, 3, 1]]


def test_accuracy_by_ranking():
    rows = [{"chosen": 1, "clip": [0.9, 0.1, 0.5], "caption_ll": [-3.0, -1.0, -2.0], "right": [False, True, False]},
            {"chosen": 2, "clip": [0.1, 0.2, 0.9], "caption_ll": [-1.0, -2.0, -1.5], "right": [True, False, False]}]
    acc = accuracy_by_ranking(rows)
    # clip picks 0, 2 (both wrong); caption picks 1 (right), 0 (right); rank_sum: [1,2,1]->0 / [2,2,2]->2 by CLIP
    assert acc == pytest.approx({"first": 0.5, "chosen": 0.5, "clip": 0.0, "caption": 1.0, "rank_sum": 0.0,
                                 "zsum": acc["zsum"], "best_of_n": 1.0, "n": 2})
    assert accuracy_by_ranking([{**rows[0], "right": None}]) == {}


def test_errors_name_the_key_and_the_fix(tok):
    with pytest.raises(ConfigError, match=r"rerank.combine=rank_sum .* no CLIP: pass rerank.ckpt="):
        check_combine("rank_sum", has_clip=False)
    with pytest.raises(ConfigError, match="rerank.combine='max' is unknown"):
        check_combine("max", has_clip=True)
    assert check_combine(None, False) is None and check_combine("zsum", True) == "zsum"
    with pytest.raises(ConfigError, match="ckpt=x.ckpt has no image -> text direction.*captioning=true"):
        check_captioning(tiny_model(tok, captioning=False), "ckpt=x.ckpt")


# -- the commands ---------------------------------------------------------------------------------------
def generate_run(tmp_path, *overrides):
    from t2i.cli.generate import run
    from tests.test_generate import generate_cfg

    return run(generate_cfg(tmp_path, "device=cpu", *overrides))


def prompts_file(tmp_path, prompts) -> str:
    path = tmp_path / "prompts.txt"  # the command line's grammar does not take CJK unquoted
    path.write_text("\n".join(prompts), encoding="utf-8")
    return f"prompts_file={path}"


def rows_of(tmp_path):
    return [json.loads(line) for line in (tmp_path / "gen" / "samples.jsonl").read_text().splitlines()]


def test_t2i_generate_backend_caption(ckpts, tok, tmp_path):
    prompts = shapes_captions(2)
    generate_run(tmp_path, f"ckpt={ckpts['cap']}", prompts_file(tmp_path, prompts), "num_samples=4", "batch_size=8",
                 "rerank.backend=caption")
    rows = rows_of(tmp_path)
    model = tiny_model(tok)  # the checkpoint's weights, no EMA: the sampling model
    text = tok.encode(prompts, 18)
    codes = generate(model, text, 4, generator=torch.Generator().manual_seed(0), **SAMPLE)
    want = model.caption_logprob(codes, text.repeat_interleave(4, 0)).view(2, 4)
    for p in range(2):
        mine = [r for r in rows if r["prompt_index"] == p]
        assert [r["sample"] for r in mine] == [0, 1, 2, 3] and all(r["reranked"] for r in mine)
        assert [r["drawn"] for r in mine] == want[p].argsort(descending=True).tolist()  # s00 is the argmax
        assert [r["caption_score"] for r in mine] == pytest.approx(want[p][[r["drawn"] for r in mine]].tolist(),
                                                                   abs=1e-5)
        assert all(r["clip_score"] is None and r["rerank"] == "caption" and r["score"] == r["caption_score"]
                   for r in mine)


def test_t2i_generate_rank_sum_records_both_scores(ckpts, tok, tmp_path):
    from t2i.pipeline.rerank import load_reranker, score

    prompts = shapes_captions(1)
    generate_run(tmp_path, f"ckpt={ckpts['cap']}", prompts_file(tmp_path, prompts), "num_samples=5",
                 f"rerank.ckpt={ckpts['clip']}", "rerank.combine=rank_sum", "rerank.top=3")
    rows = rows_of(tmp_path)
    model = tiny_model(tok)
    text = tok.encode(prompts, 18)
    codes = generate(model, text, 5, generator=torch.Generator().manual_seed(0), **SAMPLE)
    cap = model.caption_logprob(codes, text.repeat_interleave(5, 0))
    clip = score(load_reranker(ckpts["clip"]), BlockTokenizer().decode(codes), prompts[0])
    order, combined = rank_candidates(clip[None], cap[None], "rank_sum")
    assert [r["drawn"] for r in rows] == order[0, :3].tolist()  # rerank.top keeps the best 3
    assert [r["combined"] for r in rows] == combined[0, order[0, :3]].tolist()
    assert [r["clip_score"] for r in rows] == pytest.approx(clip[order[0, :3]].tolist(), abs=1e-5)
    assert [r["caption_score"] for r in rows] == pytest.approx(cap[order[0, :3]].tolist(), abs=1e-5)
    assert all(r["rerank"] == "rank_sum" for r in rows)


@pytest.mark.parametrize("overrides, message", [
    (["rerank.combine=rank_sum"], "rerank.combine=rank_sum mixes CLIP with the caption likelihood but there is no CLIP"),
    (["rerank.backend=caption", "rerank.combine=zsum"], "rerank.combine=zsum takes its CLIP from rerank.backend"),
    (["rerank.backend=caption", "rerank.ckpt=clip.ckpt"], "rerank.backend=caption ranks by the caption likelihood"),
])
def test_t2i_generate_rerank_settings_fail_before_the_model_loads(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        generate_run(tmp_path, f"ckpt={tmp_path}/missing.ckpt", "prompts=[a]", *overrides)


def test_t2i_generate_backend_caption_needs_a_captioning_checkpoint(ckpts, tmp_path):
    with pytest.raises(ConfigError, match=rf"ckpt={ckpts['plain']} has no image -> text direction"):
        generate_run(tmp_path, f"ckpt={ckpts['plain']}", prompts_file(tmp_path, shapes_captions(1)),
                     "rerank.backend=caption")


def test_t2i_eval_shapes_backend_caption_and_combined(ckpts, tok, tmp_path):
    from t2i.cli.evaluate import run
    from tests.test_eval import eval_cfg

    base = ["eval=shapes", f"ckpt={ckpts['cap']}", "eval.num_captions=4", "eval.num_candidates=3", "batch_size=4",
            "metrics.extractor=null", "metrics.inception_score=false", "metrics.cache_dir=null"]
    result = run(eval_cfg(tmp_path, *base, "rerank.backend=caption"))
    assert result["protocol"]["reranked"] and result["protocol"]["rerank"] == {"backend": "caption", "combine": None}
    scored = [json.loads(line) for line in (tmp_path / "out" / "rerank_scores.jsonl").read_text().splitlines()]
    assert [r["split"] for r in scored] == ["test"] * 4 + ["compositional"] * 4
    model = tiny_model(tok)
    caps = [r["caption"] for r in scored[:4]]
    text = tok.encode(caps, 18)
    codes = generate(model, text, 3, generator=torch.Generator().manual_seed(0), **SAMPLE)  # batch 0, seed 0 + 0
    want = model.caption_logprob(codes, text.repeat_interleave(3, 0)).view(4, 3)
    for r, w in zip(scored[:4], want):
        assert r["caption_ll"] == pytest.approx(w.tolist(), abs=1e-5) and r["chosen"] == int(w.argmax())
        assert r["clip"] is None and len(r["right"]) == 3
    for split in ("test", "compositional"):
        acc = result["splits"][split]["acc_by"]
        assert acc["chosen"] == acc["caption"] == result["splits"][split]["acc_chosen"]["all"]
        assert acc["best_of_n"] >= max(acc["first"], acc["caption"]) and acc["n"] == 4 and "clip" not in acc
    both = run(eval_cfg(tmp_path / "both", *base, f"clip.ckpt={ckpts['clip']}", "rerank.combine=rank_sum"))
    acc = both["splits"]["test"]["acc_by"]
    assert {"first", "chosen", "clip", "caption", "rank_sum", "zsum", "best_of_n", "n"} == set(acc)
    assert acc["chosen"] == acc["rank_sum"] and acc["caption"] == result["splits"]["test"]["acc_by"]["caption"]
    assert both["splits"]["test"]["clip_chosen_mean"] is not None
    with pytest.raises(ConfigError, match=r"rerank\.combine=zsum .* no CLIP: pass clip\.ckpt="):
        run(eval_cfg(tmp_path / "bad", *base, "rerank.combine=zsum"))
    with pytest.raises(ConfigError, match="has no image -> text direction"):
        run(eval_cfg(tmp_path / "bad", *base[:1], f"ckpt={ckpts['plain']}", *base[2:], "rerank.backend=caption"))


def test_generation_metrics_callback_rerank_settings(tok):
    """The callback checks its rerank block when built and the model when it first draws."""
    from t2i.callbacks.generation_metrics import GenerationMetrics

    cb = GenerationMetrics(rerank={"backend": "caption"})
    assert (cb.rerank, cb.combine) == ("caption", None)
    assert GenerationMetrics(clip={"ckpt": "c.ckpt"}, rerank={"combine": "zsum"}).combine == "zsum"
    with pytest.raises(ConfigError, match=r"generation_metrics\.rerank\.backend='clp': use clip or caption"):
        GenerationMetrics(rerank={"backend": "clp"})
    with pytest.raises(ConfigError, match=r"generation_metrics\.rerank\.combine=rank_sum .* pass "
                                          r"callbacks\.generation_metrics\.clip\.ckpt="):
        GenerationMetrics(rerank={"combine": "rank_sum"})
