"""t2i-demo end to end at tiny sizes (slow: six Hydra runs in subprocesses, about two minutes)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TINY = ["image_size=16", "shapes.n_train=96", "shapes.n_val=32", "shapes.n_test=16", "shapes.n_compositional=16",
        "vqgan.max_epochs=1", "transformer.max_epochs=1", "clip.max_epochs=1", "clip.extra=['data.batch_size=32']",
        "transformer.extra=['data.batch_size=32']", "eval.num_captions=4", "eval.num_candidates=2",
        "reconstruction.num_images=8"]
KEYS = {"tokenizer_psnr", "acc_first", "acc_rerank", "acc_compositional_first", "acc_compositional_rerank",
        "fd_clip", "clip_score", "wall_seconds"}


def run_demo(tmp_path, *extra):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "T2I_OUTPUTS": str(tmp_path / "outputs")}
    env.pop("WANDB_API_KEY", None)
    res = subprocess.run([sys.executable, "-m", "t2i.cli.demo", f"output={tmp_path / 'demo'}", *TINY, *extra],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.mark.slow
def test_reduced_demo_end_to_end_and_rerun_skips(tmp_path):
    res = run_demo(tmp_path)
    out = tmp_path / "demo"
    metrics = json.loads((out / "metrics.json").read_text())
    assert KEYS <= set(metrics)
    for k in KEYS - {"wall_seconds", "tokenizer_psnr", "clip_score", "fd_clip"}:
        assert 0.0 <= metrics[k] <= 1.0, k
    assert 0 < metrics["tokenizer_psnr"] < 100 and metrics["wall_seconds"] > 0  # one epoch: a number, not a quality
    assert list(metrics["stage_seconds"]) == ["data", "vqgan", "clip", "tokenize", "reconstruction", "transformer",
                                              "eval"]
    assert set(metrics["ci95"]) >= KEYS - {"wall_seconds", "tokenizer_psnr", "clip_score", "fd_clip"}
    report = (out / "report.md").read_text()
    assert "| compositional | reranked |" in report and "| transformer |" in report
    for png in ("samples.png", "reconstructions.png"):
        with Image.open(out / png) as im:
            assert im.size[0] > 32 and im.size[1] > 16
    for stage in ("vqgan", "transformer", "clip"):  # every training stage has its W&B run, offline
        assert list((out / stage / "wandb").glob("offline-run-*")), stage
    assert "[5/7] reconstruction" in res.stdout and "1 thread" in res.stdout  # the VQGAN and the CLIP side by side
    # a rerun finds every stage's output and only rebuilds the report
    again = run_demo(tmp_path)
    assert again.stdout.count("done earlier") == 7
    assert json.loads((out / "metrics.json").read_text())["acc_first"] == metrics["acc_first"]
