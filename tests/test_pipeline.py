"""The Python API: ``Pipeline.from_checkpoint`` loads a transformer checkpoint once and generates many times;
the same seed gives the same images through ``Pipeline`` and ``t2i-generate``; reranking, ``top``, the single
steps (encode_text, sample_codes, decode, tokenize, score, caption); settings checked where the API receives
them, with the commands' one-line messages; ``t2i.load`` / ``t2i.identify``; ``import t2i`` stays light."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from t2i.errors import ConfigError, T2IError
from tests.tiny_pipeline import BlockTokenizer, captions, text_tokenizer, tiny_model, write_checkpoints


@pytest.fixture(scope="module")
def tok():
    return text_tokenizer()


@pytest.fixture(scope="module")
def ckpts(tok, tmp_path_factory):
    return write_checkpoints(tok, tmp_path_factory.mktemp("pipeline"))


@pytest.fixture(scope="module")
def pipe(ckpts):
    from t2i import Pipeline

    return Pipeline.from_checkpoint(ckpts["transformer"], reranker=ckpts["clip"], device="cpu")


def generate_cli(tmp_path, *overrides):
    from hydra import compose, initialize_config_module

    from t2i.cli.generate import run

    with initialize_config_module("t2i.conf", version_base="1.3"):
        cfg = compose("generate", overrides=[f"paths.log_dir={tmp_path}/logs", f"output={tmp_path}/gen",
                                             "progress=false", *overrides])
    return run(cfg)


def test_the_readme_example_shape(pipe):
    prompts = captions(2)
    out = pipe(prompts, num_samples=4, top_k=4, seed=0)
    assert len(out.images) == 2 and all(len(row) == 4 for row in out.images)
    assert all(isinstance(im, Image.Image) and im.size == (24, 24) for row in out.images for im in row)
    for row in out.scores:  # best first
        assert row == sorted(row, reverse=True) and all(isinstance(s, float) for s in row)
    assert [c.shape for c in out.codes] == [torch.Size([4, 3, 3])] * 2
    assert out.settings["top_k"] == 4 and out.reranked
    # each image is its codes, decoded, in the same order
    for row, codes in zip(out.images, out.codes):
        want = (BlockTokenizer().decode(codes) + 1) / 2
        got = torch.stack([torch.as_tensor(list(im.getdata())).view(24, 24, 3).permute(2, 0, 1) for im in row])
        assert torch.equal(got, want.mul(255).add(0.5).clamp(0, 255).to(torch.uint8))


def test_same_seed_same_images_through_pipeline_and_t2i_generate(pipe, ckpts, tmp_path):
    prompts = captions(3)
    out = pipe(prompts, num_samples=4, top_k=5, seed=11, batch_size=8)  # 2 prompts a batch: two generators
    (tmp_path / "p.txt").write_text("\n".join(prompts), encoding="utf-8")
    generate_cli(tmp_path, f"ckpt={ckpts['transformer']}", f"prompts_file={tmp_path}/p.txt", "num_samples=4",
                 "top_k=5", "seed=11", "batch_size=8", f"rerank.ckpt={ckpts['clip']}")
    rows = [json.loads(line) for line in (tmp_path / "gen" / "samples.jsonl").read_text().splitlines()]
    assert rows == json.loads(json.dumps(out.records))  # the same rows, seeds and scores
    assert [r["seed"] for r in rows] == [11] * 8 + [13] * 4
    for r, im in zip(rows, [im for row in out.images for im in row]):
        with Image.open(tmp_path / "gen" / r["file"]) as saved:
            assert list(saved.convert("RGB").getdata()) == list(im.getdata())
    # Generation.save writes the same files
    out.save(tmp_path / "api")
    assert (tmp_path / "api" / "samples.jsonl").read_text() == (tmp_path / "gen" / "samples.jsonl").read_text()
    for name in ("grid_p000.png", "p002_s03.png"):
        with Image.open(tmp_path / "api" / name) as a, Image.open(tmp_path / "gen" / name) as b:
            assert list(a.getdata()) == list(b.getdata())


def test_loaded_once_generates_many_times_without_reading_files(pipe, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("the pipeline read a file again")

    monkeypatch.setattr(torch, "load", no_load)
    a = pipe(captions(1), num_samples=2, seed=3)
    b = pipe(captions(1), num_samples=2, seed=3)
    c = pipe(captions(1), num_samples=2, seed=4)
    assert torch.equal(a.codes[0], b.codes[0]) and not torch.equal(a.codes[0], c.codes[0])


def test_a_string_is_one_prompt_and_top_keeps_the_best(pipe):
    one = pipe(captions(1)[0], num_samples=5, top=2, seed=0)
    assert one.prompts == captions(1) and len(one.images) == 1 and len(one.images[0]) == 2
    full = pipe(captions(1), num_samples=5, seed=0)
    assert full.scores[0][:2] == one.scores[0]
    assert [r["drawn"] for r in one.records] == [r["drawn"] for r in full.records][:2]


def test_without_reranking_the_draw_order_is_kept(pipe):
    out = pipe(captions(1), num_samples=3, seed=0, rerank=False)
    assert [r["drawn"] for r in out.records] == [0, 1, 2] and out.scores[0] == [None] * 3 and not out.reranked


def test_the_steps_one_by_one(pipe, tok):
    prompts = captions(2)
    ids = pipe.encode_text(prompts)
    assert torch.equal(ids, tok.encode(prompts, 18))
    codes = pipe.sample_codes(prompts, num_samples=2, seed=5)
    from t2i.sampling import generate

    want = generate(tiny_model(tok), ids, 2, generator=torch.Generator().manual_seed(5))
    assert torch.equal(codes, want)
    pics = pipe.decode(codes)
    assert pics.shape == (4, 3, 24, 24) and pics.min() >= 0 and pics.max() <= 1
    assert torch.equal(pipe.tokenize(pics), codes)  # the block tokenizer is lossless on its own images
    from t2i.pipeline.text_to_image import to_pil

    assert torch.equal(pipe.tokenize(to_pil(pics)), codes)  # PIL in, same codes
    s = pipe.score(pics, [prompts[0]] * 2 + [prompts[1]] * 2)
    assert s.shape == (4,) and torch.isfinite(s).all()
    caps = pipe.caption(pics[:2], method="greedy")
    assert len(caps) == 2 and all(isinstance(c, str) for c in caps)
    from t2i.captioning import caption

    assert caps == list(tok.decode(caption(tiny_model(tok), codes[:2], method="greedy")))


@pytest.mark.parametrize("kwargs, message", [
    ({"top_p": 1.5}, "top_p=1.5 must be in (0, 1]"),
    ({"temperature": -1}, "temperature=-1 must be >= 0"),
    ({"num_samples": 0}, "num_samples=0 must be an integer >= 1"),
    ({"batch_size": 0}, "batch_size=0 must be an integer >= 1"),
    ({"top_k": 0}, "top_k=0 must be an integer >= 1"),
    ({"top": 0}, "rerank.top=0 must be an integer >= 1"),
])
def test_call_settings_are_checked_with_the_commands_messages(pipe, kwargs, message):
    with pytest.raises(ConfigError) as e:
        pipe(captions(1), **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_from_checkpoint_errors(ckpts, tmp_path):
    from t2i import Pipeline

    with pytest.raises(ConfigError, match=r"ckpt=.*missing\.ckpt: no such file"):
        Pipeline.from_checkpoint(tmp_path / "missing.ckpt")
    with pytest.raises(T2IError, match="is not a transformer checkpoint"):
        Pipeline.from_checkpoint(ckpts["clip"])
    with pytest.raises(ConfigError, match="rerank.combine=rank_sum mixes CLIP with the caption likelihood"):
        Pipeline.from_checkpoint(ckpts["transformer"], combine="rank_sum")
    with pytest.raises(ConfigError, match="has no image -> text direction"):
        Pipeline.from_checkpoint(ckpts["plain"], reranker="caption")
    with pytest.raises(ConfigError, match=r"sr\.ckpt=.*nope\.pth: no such file"):
        Pipeline.from_checkpoint(ckpts["transformer"], upscaler=tmp_path / "nope.pth")
    with pytest.raises(ConfigError, match="dtype=fp16 needs a GPU"):
        Pipeline.from_checkpoint(ckpts["transformer"], dtype="fp16", device="cpu")


def test_caption_reranking_and_combined(ckpts, tok):
    from t2i import Pipeline

    by_caption = Pipeline.from_checkpoint(ckpts["transformer"], reranker="caption")
    out = by_caption(captions(1), num_samples=4, seed=0)
    assert out.records[0]["rerank"] == "caption" and out.scores[0] == sorted(out.scores[0], reverse=True)
    both = Pipeline.from_checkpoint(ckpts["transformer"], reranker=ckpts["clip"], combine="rank_sum")
    rows = both(captions(1), num_samples=4, seed=0).records
    assert all(r["rerank"] == "rank_sum" and r["clip_score"] is not None and r["caption_score"] is not None
               for r in rows)


def test_load_tells_what_a_file_is(ckpts, tmp_path):
    import t2i
    from t2i.pipeline.rerank import Reranker

    assert t2i.identify(ckpts["transformer"]) == "transformer" and t2i.identify(ckpts["clip"]) == "clip"
    assert isinstance(t2i.load(ckpts["transformer"], device="cpu"), t2i.Pipeline)
    assert isinstance(t2i.load(ckpts["clip"], device="cpu"), Reranker)
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(T2IError, match="is not a t2i checkpoint.*t2i-import"):
        t2i.load(tmp_path / "other.pt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a zip")
    with pytest.raises(T2IError, match="cannot be read as weights"):
        t2i.identify(tmp_path / "junk.ckpt")
    with pytest.raises(T2IError, match="no such file"):
        t2i.load(tmp_path / "absent.ckpt")


def test_import_t2i_is_light():
    code = ("import sys, t2i; heavy = [m for m in ('hydra', 'pytorch_lightning', 'lightning', 'torch') "
            "if m in sys.modules]; print(','.join(heavy)); t2i.Pipeline; print('hydra' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    first, second = res.stdout.splitlines()
    assert first == "" and second == "False"  # neither on import nor when the API is reached
