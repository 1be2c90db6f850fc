"""Command input as a new user writes it (issue 30, items 6-10 and 15): a string is one prompt, a prompts
file that is not UTF-8 text or holds no caption is one line naming the file, ``output=`` on a file is one line
before any model loads, ``t2i-eval``'s counts / splits / language are refused naming the allowed values, and
``top_k`` has one default for ``t2i-generate``, ``t2i-eval`` and the Python API, recorded where a run writes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_module

from t2i.data.prompts import check_output_folder, prompt_list, read_prompts_file
from t2i.errors import ConfigError
from tests.tiny_pipeline import captions, text_tokenizer, write_checkpoints


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return write_checkpoints(text_tokenizer(), tmp_path_factory.mktemp("input"))


def compose_cfg(name, tmp_path, *overrides):
    with initialize_config_module("t2i.conf", version_base="1.3"):
        return compose(name, overrides=[f"paths.log_dir={tmp_path}/logs", "progress=false", *overrides])


def generate(tmp_path, *overrides):
    from t2i.cli.generate import run

    return run(compose_cfg("generate", tmp_path, f"output={tmp_path}/gen", *overrides))


def cli(module, tmp_path, *overrides):
    res = subprocess.run([sys.executable, "-c", f"from t2i.cli.{module} import main; main()",
                          f"hydra.run.dir={tmp_path}/h", *overrides], capture_output=True, text=True)
    return res.returncode, res.stderr.strip().splitlines()


# -- 6: a string is one prompt --------------------------------------------------------------------------
def test_a_string_is_one_prompt_never_its_characters(ckpts, tmp_path):
    caption = captions(1)[0]
    res = generate(tmp_path, f"ckpt={ckpts['transformer']}", f"prompts='{caption}'", "num_samples=2")
    rows = [json.loads(x) for x in (tmp_path / "gen" / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert res["count"] == 2 and {r["prompt"] for r in rows} == {caption}
    assert prompt_list("一个红色的圆形") == ["一个红色的圆形"]
    assert prompt_list(["一个", "红色"]) == ["一个", "红色"]


@pytest.mark.parametrize("value, message", [
    ({"a": 1}, "is not a caption or a list of captions"),
    (5, "is not a caption or a list of captions"),
    ([["nested"]], "prompts[0]=['nested'] is not a caption"),
    ([None], "prompts[0]=None is not a caption"),
    ([b"bytes"], "prompts[0] is bytes, not text"),
])
def test_prompt_values_that_are_not_captions(value, message):
    with pytest.raises(ConfigError) as e:
        prompt_list(value)
    assert message in str(e.value) and "\n" not in str(e.value)


# -- 7 and 10: prompts files ------------------------------------------------------------------------------
@pytest.mark.parametrize("data, message", [
    (b"a red circle\n\xff\xfe bad\n", "is not UTF-8 text (byte 13: b'\\xff\\xfe b'); give a UTF-8 text file, one caption a line"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "is not UTF-8 text (byte 0: b'\\x89PNG')"),
    (b"ok\x00\x00\x00binary", "holds a NUL byte at byte 2 (a binary file?)"),
    (b"\n   \n\t\n", "holds no caption (only blank lines): write one caption a line"),
    (b"", "holds no caption (it is empty)"),
])
def test_prompts_file_refusals_name_the_file(tmp_path, data, message):
    path = tmp_path / "p.txt"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as e:
        read_prompts_file(path)
    assert str(e.value).startswith(f"prompts_file={path} ") and message in str(e.value)
    assert "\n" not in str(e.value)


def test_prompts_file_folder_missing_and_bom(tmp_path):
    with pytest.raises(ConfigError, match="is a folder, not a file"):
        read_prompts_file(tmp_path)
    with pytest.raises(ConfigError, match="no such file"):
        read_prompts_file(tmp_path / "nope.txt")
    (tmp_path / "bom.txt").write_bytes("\ufeff一个圆\r\n\r\n  两个 \n".encode())
    assert read_prompts_file(tmp_path / "bom.txt") == ["一个圆", "两个"]


@pytest.mark.parametrize("data", [b"\xff\xfe\x00a", b"\n\n"])
def test_generate_prints_one_line_for_a_bad_prompts_file(tmp_path, data):
    (tmp_path / "p.txt").write_bytes(data)
    rc, err = cli("generate", tmp_path, f"ckpt={tmp_path}/missing.ckpt", f"prompts_file={tmp_path}/p.txt")
    assert rc == 1 and len(err) == 1 and err[0].startswith(f"error: prompts_file={tmp_path}/p.txt "), err


# -- 8: output= on a file -----------------------------------------------------------------------------------
def test_output_on_a_file_is_one_line_before_the_model_loads(tmp_path):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(ConfigError, match=r"output=.*taken is a file, not a folder"):
        check_output_folder(tmp_path / "taken")
    with pytest.raises(ConfigError, match=r"taken is a file, so the folder cannot be created there"):
        check_output_folder(tmp_path / "taken" / "sub")
    # the checkpoint does not exist: the output error must come first
    rc, err = cli("generate", tmp_path, f"ckpt={tmp_path}/missing.ckpt", "prompts=[a]", f"output={tmp_path}/taken")
    assert rc == 1 and err == [f"error: output={tmp_path}/taken is a file, not a folder: pass a folder (it is "
                               "created when missing)"]


def evaluate(tmp_path, *overrides):
    """t2i-eval's run() in-process (the subprocess path is test_eval_prints_one_line below)."""
    from t2i.cli.evaluate import run

    return run(compose_cfg("eval", tmp_path, "eval=shapes", f"ckpt={tmp_path}/missing.ckpt", *overrides))


def test_eval_output_on_a_file(tmp_path):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(ConfigError, match=r"^output=.*taken is a file, not a folder"):
        evaluate(tmp_path, f"output={tmp_path}/taken")


# -- 9: t2i-eval counts, splits, language -------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("eval.num_captions=0", "eval.num_captions=0 must be an integer >= 1"),
    ("eval.num_captions=-3", "eval.num_captions=-3 must be an integer >= 1"),
    ("eval.splits=[validation]", "eval.splits=['validation']: unknown split 'validation'; use some of train, val, test, compositional"),
    ("eval.splits=[]", "eval.splits=[] names no split; use some of train, val, test, compositional"),
    ("eval.splits=test", "eval.splits=test must be a list, e.g. eval.splits=[test]"),
    ("eval.lang=fr", "eval.lang=fr is unknown; use zh or en"),
])
def test_eval_refuses_bad_protocol_values_in_one_line(tmp_path, override, message):
    with pytest.raises(ConfigError) as e:
        evaluate(tmp_path, f"output={tmp_path}/out", override)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_eval_prints_one_line(tmp_path):
    rc, err = cli("evaluate", tmp_path, "eval=shapes", f"ckpt={tmp_path}/missing.ckpt", "eval.lang=fr")
    assert rc == 1 and err == ["error: eval.lang=fr is unknown; use zh or en"], err


# -- 15: one top_k default --------------------------------------------------------------------------------
def test_one_top_k_default_for_generate_eval_and_the_api(tmp_path):
    import inspect

    from t2i.pipeline import Pipeline
    from t2i.sampling import DEFAULT_TOP_K

    assert compose_cfg("generate", tmp_path).top_k == DEFAULT_TOP_K
    for protocol in ("shapes", "muge", "coco_cn", "coco30k"):
        assert compose_cfg("eval", tmp_path, f"eval={protocol}").sample.top_k == DEFAULT_TOP_K, protocol
    assert inspect.signature(Pipeline.__call__).parameters["top_k"].default == DEFAULT_TOP_K
