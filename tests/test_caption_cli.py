"""t2i-caption: a folder (one file that is not an image), shapes:<split>; captions equal t2i.captioning.caption
on the same codes; a checkpoint without the direction is one clear error."""

from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_module
from PIL import Image

from t2i.errors import ConfigError
from tests.test_caption_scoring import caption_ckpt  # noqa: F401 (the fixture)


def caption_cfg(tmp_path, *overrides):
    with initialize_config_module("t2i.conf", version_base="1.3"):
        return compose("caption", overrides=[f"paths.log_dir={tmp_path}/logs", f"output={tmp_path}/out",
                                             "progress=false", "device=cpu", *overrides])


def test_folder_of_images_with_a_bad_file(caption_ckpt, tmp_path):  # noqa: F811
    from t2i.captioning import caption
    from t2i.cli.caption import run
    from t2i.cli.generate import build

    folder = tmp_path / "imgs"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(5):
        arr = (torch.rand(8, 8, 3, generator=g) * 255).byte().numpy()
        Image.fromarray(arr).save(folder / f"im{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    cfg = caption_cfg(tmp_path, f"ckpt={caption_ckpt}", f"images={folder}", "caption.method=greedy", "batch_size=2")
    result = run(cfg)
    assert result["count"] == 5 and result["skipped"] == 1
    lines = [json.loads(x) for x in (tmp_path / "out" / "captions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [x["key"] for x in lines] == [f"im{i}.png" for i in range(5)]
    assert (tmp_path / "out" / "captions.png").is_file()
    model, image_tok, tok, _ = build(cfg, torch.device("cpu"))  # the same captions, computed directly
    x = torch.stack([torch.as_tensor(__import__("numpy").asarray(Image.open(folder / f"im{i}.png"))).permute(2, 0, 1)
                     for i in range(5)]).float() / 127.5 - 1
    direct = tok.decode(caption(model, image_tok.encode(x), method="greedy"))
    assert [x["caption"] for x in lines] == direct


def test_shapes_split_and_errors(caption_ckpt, tmp_path):  # noqa: F811
    from t2i.cli.caption import run

    result = run(caption_cfg(tmp_path, f"ckpt={caption_ckpt}", "images=shapes:test", "num_images=4"))
    assert result["count"] == 4 and all(r["method"] == "beam" for r in result["rows"])
    with pytest.raises(ConfigError, match="caption.beam_size=0"):
        run(caption_cfg(tmp_path, f"ckpt={caption_ckpt}", "images=shapes:test", "caption.beam_size=0"))
    with pytest.raises(ConfigError, match="not a folder, shards or shapes"):
        run(caption_cfg(tmp_path, f"ckpt={caption_ckpt}", f"images={tmp_path}/nothing"))
