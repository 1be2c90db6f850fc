"""t2i-generate input checks: settings that cannot work are one ConfigError naming the key, raised
before any model is loaded; prompts with unknown tokens give one summary warning, mostly-unknown
prompts an error unless allow_unk; the sampler checks its own arguments."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module

from t2i.cli.generate import check_prompts, encode_prompts, run
from t2i.data.tokenizer import TextTokenizer
from t2i.errors import ConfigError
from t2i.models.transformer import Transformer
from t2i.sampling import check_sampling, generate


def generate_cfg(tmp_path, *overrides):
    with initialize_config_module("t2i.conf", version_base="1.3"):
        return compose("generate", overrides=[f"paths.log_dir={tmp_path}/logs", f"output={tmp_path}/gen",
                                              "progress=false", *overrides])


@pytest.mark.parametrize("override, message", [
    ("top_p=1.5", "top_p=1.5 must be in (0, 1]"),
    ("top_p=0", "top_p=0 must be in (0, 1]"),
    ("temperature=-0.5", "temperature=-0.5 must be >= 0 (0 is greedy"),
    ("top_k=0", "top_k=0 must be an integer >= 1"),
    ("batch_size=0", "batch_size=0 must be an integer >= 1"),
    ("num_samples=0", "num_samples=0 must be an integer >= 1"),
    ("cfg_scale=nan", "cfg_scale=nan must be a finite number"),
    ("prompts=['a cat','  ']", "prompts[1] is empty"),
])
def test_bad_settings_fail_before_the_model_loads(tmp_path, override, message):
    # the checkpoint does not exist: a settings error must come first, not "no such file"
    cfg = generate_cfg(tmp_path, f"ckpt={tmp_path}/missing.ckpt", "prompts=[a cat]", override)
    with pytest.raises(ConfigError) as e:
        run(cfg)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_cli_prints_one_line_and_exits_1(tmp_path):
    res = subprocess.run([sys.executable, "-c", "from t2i.cli.generate import main; main()",
                          f"hydra.run.dir={tmp_path}/h", f"ckpt={tmp_path}/missing.ckpt", "prompts=[a]", "top_p=2"],
                         capture_output=True, text=True)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == ["error: top_p=2 must be in (0, 1] (1 keeps every token; null: no "
                                                "top-p filtering)"]


def test_check_sampling_accepts_the_edges():
    check_sampling(1, top_k=1, top_p=1.0, temperature=0.0, cfg_scale=3)  # greedy, everything kept: fine
    check_sampling(8, top_k=None, top_p=1e-6, temperature=2.5, cfg_scale=None)
    check_sampling(np.int64(4), top_k=np.int32(16), top_p=np.float32(0.9), temperature=np.float64(0.7))
    with pytest.raises(ConfigError, match=r"^sample\.top_p=-1 must be in"):
        check_sampling(1, top_p=-1, prefix="sample.")
    with pytest.raises(ConfigError, match="num_samples=2.5 must be an integer"):
        check_sampling(2.5)


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.train(["一个大的红色圆形在左上角", "一个小的蓝色方形在右下角", "a red circle"] * 3, vocab_size=100)


def test_unknown_tokens_one_warning_and_mostly_unknown_is_an_error(tok, caplog):
    prompts = ["一个红色圆形", "一个红色的猫", "红色的狗", "a red circle"]  # 1 and 2 have unknown chars
    with caplog.at_level(logging.WARNING, logger="t2i.generate"):
        ids = encode_prompts(tok, prompts, text_len=8)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("2 of 4 prompt(s) have pieces unknown") and "1 ('猫')" in warnings[0]
    assert "2 ('狗')" in warnings[0]
    assert (ids[1] == tok.unk_id).sum() == 1
    # more than half of the tokens unknown: an error naming the prompt and the way out
    with pytest.raises(ConfigError, match=r"prompts\[1\]='火星上的x': 3 of its 5 tokens are unknown .*allow_unk=true"):
        check_prompts(tok, ["红色", "火星上的x"], text_len=8, allow_unk=False)
    check_prompts(tok, ["红色的猫"], text_len=8, allow_unk=False)  # 1 of 4 unknown: fine
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="t2i.generate"):
        check_prompts(tok, ["火星上的x"], text_len=8, allow_unk=True)
    assert "1 of 1 prompt(s) have pieces unknown" in caplog.text
    with pytest.raises(ConfigError, match="encodes to no token"):
        check_prompts(tok, ["\u200b"], text_len=8)


def test_long_prompts_one_warning(tok, caplog):
    with caplog.at_level(logging.WARNING, logger="t2i.generate"):
        check_prompts(tok, ["一个大的红色圆形在左上角"] * 3, text_len=4)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["3 prompt(s) have more tokens than the model reads (text_len=4), the rest is cut: "
                        "prompt 0 (12), 1 (12), 2 (12)"]


def tiny() -> Transformer:
    torch.manual_seed(0)
    return Transformer(text_vocab=40, text_len=5, image_vocab=24, image_grid=(2, 2), n_layer=1, n_head=2,
                       d_model=16).eval()


def test_sampler_checks_its_arguments():
    m, text = tiny(), torch.randint(1, 40, (2, 5))
    for kw, message in [
        (dict(top_p=0.0), "top_p=0.0 must be in (0, 1]"),
        (dict(temperature=-1.0), "temperature=-1.0 must be >= 0"),
        (dict(top_k=-3), "top_k=-3 must be an integer >= 1"),
        (dict(num_samples=0), "num_samples=0 must be an integer >= 1"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
            generate(m, text, **{"num_samples": 1, **kw})
    with pytest.raises(ConfigError, match=r"shape \[2, 4\]; the model reads \[batch, 5\]"):
        generate(m, text[:, :4])
    with pytest.raises(ConfigError, match=r"ids outside \[0, 40\)"):
        generate(m, text + 40)
    # greedy is temperature 0, and equals top_k=1
    g = torch.Generator().manual_seed(0)
    assert torch.equal(generate(m, text, 2, temperature=0.0), generate(m, text, 2, top_k=1, generator=g))


@pytest.mark.parametrize("override, message", [
    ("sample.top_p=2", "sample.top_p=2 must be in (0, 1]"),
    ("sample.temperature=-1", "sample.temperature=-1 must be >= 0"),
    ("eval.num_candidates=0", "eval.num_candidates=0 must be an integer >= 1"),
    ("batch_size=0", "batch_size=0 must be an integer >= 1"),
])
def test_t2i_eval_checks_its_sampling_settings_first(tmp_path, override, message):
    from t2i.cli.evaluate import run as evaluate

    with initialize_config_module("t2i.conf", version_base="1.3"):
        cfg = compose("eval", overrides=["eval=shapes", f"ckpt={tmp_path}/missing.ckpt", f"output={tmp_path}/out",
                                         f"paths.log_dir={tmp_path}/logs", "progress=false", override])
    with pytest.raises(ConfigError) as e:
        evaluate(cfg)
    assert message in str(e.value)
