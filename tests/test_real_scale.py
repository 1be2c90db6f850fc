"""The full-geometry dry run (experiments/real_scale/run.py) end to end: 256 px MUGE-format data, the real
f16-16384 VQGAN and the full-size muge_transformer, through the same CLIs a user runs. Slow: ~15 minutes on
two CPU cores."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def load_run():
    spec = importlib.util.spec_from_file_location("real_scale_run", ROOT / "experiments" / "real_scale" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_real_scale_dry_run(tmp_path):
    out = tmp_path / "rs"
    result = load_run().main(["--out", str(out), "--n", "24", "--n-val", "4", "--vqgan-steps", "1", "--steps", "2",
                              "--batch", "2", "--samples", "1", "--captions", "2", "--candidates", "1"])
    names = [s["stage"] for s in result["stages"]]
    assert names[-1] == "t2i-eval eval=muge" and len(names) == 9

    # stage 1 at the real geometry: 16x16 codes of 16384 from 256 px
    manifest = json.loads(next((out / "data" / "codes" / "muge_256").rglob("manifest.json")).read_text())
    assert manifest["codebook_size"] == 16384 and list(manifest["grid"]) == [16, 16]
    for stage in ("vqgan", "transformer"):
        ckpts = out / "runs" / stage / "checkpoints"
        assert (ckpts / "best.ckpt").is_file() and (ckpts / "last.ckpt").is_file()

    # stage 2 at full size: 12 x 768, text 32 + 256 image tokens
    hp = torch.load(out / "runs" / "transformer" / "checkpoints" / "best.ckpt", map_location="cpu",
                    weights_only=False)["hyper_parameters"]["model"]
    assert (hp["n_layer"], hp["d_model"], hp["text_len"], tuple(hp["image_grid"]), hp["image_vocab"]) == \
        (12, 768, 32, (16, 16), 16384)
    m = result["flops"]
    assert m["seq"] == 32 + 256 and m["transformer_params"] > 1e8
    # a forward + backward costs about 6 FLOPs per parameter and token (plus attention)
    assert 0.7 < m["transformer_train_flops_per_sample"] / (6 * m["transformer_params"] * m["seq"]) < 2.0

    images = sorted((out / "samples").glob("p*_s*.png"))
    assert images and Image.open(images[0]).size == (256, 256)
    ev = result["eval"]
    fid = next(v for k, v in _flatten(ev) if k.endswith("fid"))
    assert math.isfinite(fid)
    text = (out / "RESULTS.md").read_text()
    assert "A100" in text and "t2i-eval" in text


def _flatten(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            yield f"{prefix}{k}", float(v)
