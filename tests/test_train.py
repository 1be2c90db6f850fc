"""t2i-train end to end with a tiny real LightningModule (tests/tiny_module.py) on a small Shapes set."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import open_dict

from t2i.cli.train import metric_value, train
from t2i.data.tokenizer import TextTokenizer
from t2i.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SEARCH = f"hydra.searchpath=[file://{ROOT}/tests/conf]"
SMALL = [
    "data.shapes.n_train=96", "data.shapes.n_val=32", "data.shapes.n_test=32", "data.shapes.n_compositional=8",
    "data.image_size=32", "data.batch_size=16", "data.num_workers=0",
]


def compose_train(tmp_path, overrides):
    with initialize_config_module("t2i.conf", version_base="1.3"):
        cfg = compose("train", overrides=[
            SEARCH, f"paths.output_dir={tmp_path}/run", f"paths.data_dir={tmp_path}/data", *SMALL, *overrides])
    return cfg


def test_train_fits_tests_and_saves(tmp_path):
    cfg = compose_train(tmp_path, [
        "model=tiny", "logger=csv", "trainer.max_epochs=3", "trainer.enable_progress_bar=false",
        "callbacks.model_checkpoint.monitor=val/loss", "optimized_metric=val/loss", "callbacks.rich_summary=null",
    ])
    metrics, obj = train(cfg)
    run = tmp_path / "run"
    # the resolved config is saved with the run, no interpolations left
    saved = (run / "config.yaml").read_text()
    assert "model:" in saved and "${" not in saved
    # best + last checkpoints; each carries the resolved config and the text tokenizer
    best = obj["trainer"].checkpoint_callback.best_model_path
    assert best and Path(best).exists() and (run / "checkpoints" / "last.ckpt").exists()
    assert obj["trainer"].ckpt_path == best  # the test ran on the best checkpoint
    ckpt = torch.load(best, map_location="cpu", weights_only=False)
    assert ckpt["t2i_config"]["model"]["_target_"] == "tests.tiny_module.TinyModule"
    dm_state = ckpt["ImageTextDataModule"]
    assert TextTokenizer.from_file(run / "tokenizer.json").fingerprint == dm_state["tokenizer_fingerprint"]
    assert dm_state["tokenizer_fingerprint"] == obj["datamodule"].tokenizer.fingerprint
    # it learned something (colour words -> mean colour) and the test ran on the best checkpoint
    assert metrics["test/loss"] < 0.5 * metrics_first_epoch(run)
    assert metric_value(metrics, "val/loss") == metrics["val/loss"]
    with pytest.raises(ConfigError, match="optimized_metric=val/nope was not logged"):
        metric_value(metrics, "val/nope")


def metrics_first_epoch(run: Path) -> float:
    import csv

    rows = list(csv.DictReader(open(next(run.glob("csv/*/metrics.csv")))))
    return float(next(r["val/loss"] for r in rows if r.get("val/loss")))


def test_resume_with_other_tokenizer_is_a_clear_error(tmp_path):
    from t2i.data.skips import DataError
    cfg = compose_train(tmp_path, ["model=tiny", "logger=csv", "trainer.max_epochs=1", "callbacks=none",
                                   "trainer.enable_progress_bar=false", "test=false"])
    _, obj = train(cfg)
    ckpt = next((tmp_path / "run").rglob("*.ckpt"))
    other = tmp_path / "other_tokenizer.json"
    TextTokenizer.train(["完全不同的词表", "another vocabulary"], vocab_size=50).save(other)
    cfg2 = compose_train(tmp_path, ["model=tiny", "logger=csv", "trainer.max_epochs=2", "callbacks=none",
                                    "trainer.enable_progress_bar=false", "test=false", f"ckpt_path='{ckpt}'"])
    with open_dict(cfg2):
        cfg2.data.tokenizer = str(other)
    with pytest.raises(DataError, match="different text tokenizer"):
        train(cfg2)


def test_no_model_is_a_clear_error(tmp_path):
    cfg = compose_train(tmp_path, ["logger=csv"])
    with pytest.raises(ConfigError, match="no model selected"):
        train(cfg)


def run_cli(args, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "T2I_OUTPUTS": str(tmp_path / "outputs"),
           "T2I_DATA": str(tmp_path / "data"), "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)


def test_cli_no_model_exits_with_one_line(tmp_path):
    res = run_cli(["t2i.cli.train", "logger=csv"], tmp_path)
    assert res.returncode == 1
    assert "error: no model selected: pass `experiment=<name>`" in res.stderr
    assert "Traceback" not in res.stderr


def test_cli_bad_override(tmp_path):
    res = run_cli(["t2i.cli.train", "data.batch_sise=3"], tmp_path)
    assert res.returncode == 1
    assert "batch_sise" in res.stderr and "Could not override" in res.stderr


def test_cli_missing_tokenizer_file_names_key_and_path(tmp_path):
    res = run_cli(["t2i.cli.train", f"{SEARCH}", "model=tiny", "data=easynlp_tsv", "logger=csv",
                   "data.tokenizer=/nope/tok.json"], tmp_path)
    assert res.returncode == 1
    assert "error: data.tokenizer=/nope/tok.json: no such tokenizer.json or vocab.txt" in res.stderr


def test_cli_multirun_sweep(tmp_path):
    """`-m` runs one job per value and each returns the optimized metric."""
    args = ["t2i.cli.train", "-m", SEARCH, "model=tiny", "logger=csv", "callbacks=none", "model.lr=0.05,0.01",
            "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "test=false",
            "optimized_metric=val/loss", *SMALL]
    res = run_cli(args, tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    runs = sorted((tmp_path / "outputs" / "train" / "multiruns").glob("*/*/config.yaml"))
    assert len(runs) == 2
    assert {"lr: 0.05" in r.read_text() for r in runs} == {True, False}
