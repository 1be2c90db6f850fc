"""t2i-app in a real browser: the page is served on a free localhost port with tiny checkpoints made here, driven in
headless Chromium (Debian's chromium + chromium-driver, through Selenium; nothing is downloaded), and what it shows
is checked against :class:`t2i.pipeline.Pipeline` with the same settings and seed, pixel for pixel."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest

from tests.app_browser import Page, chromium, fetch, fetch_image, free_port, have_chromium
from tests.tiny_pipeline import captions, text_tokenizer, write_checkpoints

pytestmark = pytest.mark.skipif(not have_chromium(), reason="needs Chromium: apt-get install -y chromium "
                                                            "chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver)")


def app_config(overrides: list[str]):
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module("t2i.conf", version_base="1.3"):
        cfg = compose("app", overrides=overrides)
    GlobalHydra.instance().clear()
    return cfg


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return write_checkpoints(text_tokenizer(), tmp_path_factory.mktemp("app_ckpt"))


@pytest.fixture(scope="module")
def server(ckpts, tmp_path_factory):
    """The app as ``t2i-app ckpt=... rerank.ckpt=...`` serves it (its ``serve``, in this process)."""
    from t2i.cli.app import serve

    out = tmp_path_factory.mktemp("app_out")
    cfg = app_config([f"ckpt={ckpts['transformer']}", f"rerank.ckpt={ckpts['clip']}", "device=cpu",
                      f"port={free_port()}", f"output={out}"])
    page, url = serve(cfg, block=False)
    yield url, out
    page.close()


@pytest.fixture(scope="module")
def browser():
    driver = chromium()
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def pipe(ckpts):
    from t2i.pipeline import Pipeline

    return Pipeline.from_checkpoint(ckpts["transformer"], reranker=ckpts["clip"], device="cpu")


def pixels(img) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


def test_generate_tab_shows_what_the_pipeline_makes(server, browser, pipe, tmp_path):
    url, out = server
    page = Page(browser, url)
    prompts = captions(2, "test")
    status = page.generate(prompts="\n".join(prompts), num_samples=3, top_k=3, top_p="", seed=7)
    assert status.startswith("6 images for 2 prompt(s)") and "best first" in status, status

    want = pipe(prompts, 3, top_k=3, top_p=None, temperature=1.0, cfg_scale=None, seed=7, batch_size=32)
    shown = page.gallery()
    assert len(shown) == 6
    for (src, caption), img, rec in zip(shown, [im for ims in want.images for im in ims], want.records):
        assert (pixels(fetch_image(src)) == pixels(img)).all(), f"{src} is not the pipeline's {rec['file']}"
        assert img.size == (24, 24)
        assert f"seed {rec['seed']}" in caption and f"CLIP {rec['clip_score']:.4f}" in caption, caption
    rows = page.table()
    assert [(r["prompt"], r["sample"]) for r in rows] == [(r["prompt_index"], r["sample"]) for r in want.records]
    for row, rec in zip(rows, want.records):
        assert float(row["clip"]) == pytest.approx(rec["clip_score"], abs=1e-5)
        assert int(row["seed"]) == rec["seed"] == 7
    scores = [float(r["clip"]) for r in rows]
    assert scores[:3] == sorted(scores[:3], reverse=True) and scores[3:] == sorted(scores[3:], reverse=True)

    # the download is the folder t2i-generate writes: the same files, the same samples.jsonl rows
    archive = zipfile.ZipFile(io.BytesIO(fetch(page.download_url())))
    ref = want.save(tmp_path / "ref")
    assert sorted(archive.namelist()) == sorted(p.name for p in ref.iterdir())
    got = [json.loads(line) for line in archive.read("samples.jsonl").decode().splitlines()]
    exp = [json.loads(line) for line in (ref / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [{k: v for k, v in r.items() if not isinstance(v, float)} for r in got] == \
           [{k: v for k, v in r.items() if not isinstance(v, float)} for r in exp]
    for g, e in zip(got, exp):
        assert g["clip_score"] == pytest.approx(e["clip_score"], abs=1e-6)
    for name in ("p000_s00.png", "p001_s02.png"):
        from PIL import Image

        assert (pixels(Image.open(io.BytesIO(archive.read(name)))) == pixels(Image.open(ref / name))).all()
    assert (out / "requests").is_dir()


def test_bad_setting_shows_the_cli_line_and_the_server_goes_on(server, browser):
    from t2i.errors import ConfigError
    from t2i.pipeline import Pipeline

    with pytest.raises(ConfigError) as exc:
        Pipeline.check(top_p=2)  # what t2i-generate top_p=2 prints, after "error: "
    url, _ = server
    page = Page(browser, url)
    prompt = captions(1, "test")[0]
    assert page.generate(prompts=prompt, num_samples=2, top_p=2) == f"error: {exc.value}"
    assert page.gallery() == []
    from selenium.webdriver.support.ui import WebDriverWait

    page.find("#t2i-random-seed").click()
    WebDriverWait(browser, 10, poll_frequency=0.1).until(lambda d: page.value("t2i-seed") not in ("", "0"))
    page.generate(top_p=0.9)
    status = page.status()
    assert status.startswith("2 images for 1 prompt(s)"), status
    seed = int(page.value("t2i-seed"))
    assert len(page.gallery()) == 2 and all(f"seed {seed}" in c for _, c in page.gallery())


def test_a_missing_checkpoint_stops_the_app_with_one_line(tmp_path, capsys):
    from t2i.cli.app import serve
    from t2i.cli.common import clear_errors

    cfg = app_config([f"ckpt={tmp_path / 'nothing.ckpt'}", "device=cpu", f"output={tmp_path}"])
    with pytest.raises(SystemExit) as e:
        clear_errors(serve)(cfg)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and err.startswith("error: ") and "nothing.ckpt" in err and "\n" not in err


def test_caption_and_layout_tabs_answer_as_the_library(ckpts, tmp_path, monkeypatch):
    """The Caption and Layout requests (no browser): the captions of Pipeline.caption, the images of the
    Synthesizer; a transformer without captioning gets a Caption tab that says why."""
    from PIL import Image

    from t2i.cli import app
    from t2i.pipeline import Pipeline, Synthesizer
    from t2i.pipeline import spade as spade_lib
    from tests.test_synthesize import StandInSPADE, save_standin
    from tests.tiny_pipeline import COLORS

    monkeypatch.setattr(spade_lib, "module_class", lambda: StandInSPADE)
    spade = save_standin(tmp_path / "spade.ckpt", num_classes=5, image_size=16)
    cfg = app_config([f"ckpt={ckpts['transformer']}", f"spade.ckpt={spade}", "device=cpu", f"output={tmp_path}"])
    models = app.load(cfg)
    assert models.captioning and models.synth is not None and not models.pipe.reranking.active

    files = []
    for i in range(2):
        arr = np.array(COLORS, np.uint8)[np.random.default_rng(i).integers(0, len(COLORS), (3, 3))]
        files.append(tmp_path / f"im{i}.png")
        Image.fromarray(arr.repeat(8, 0).repeat(8, 1)).save(files[-1])
    items, table, status = app.caption_images(models, cfg, [str(f) for f in files], "greedy")
    want = Pipeline.from_checkpoint(ckpts["transformer"], device="cpu").caption(
        [Image.open(f) for f in files], method="greedy", beam_size=4)
    assert [c for _, c in items] == want and status == "2 caption(s), greedy"
    assert app.caption_images(models, cfg, [], "beam")[2] == "error: no images: upload one or more"

    label = tmp_path / "map.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 5, (16, 16)).astype(np.uint8), mode="L").save(label)
    items, status = app.synthesize_maps(models, [str(label)], "random", 2, 3)
    ref = Synthesizer.from_checkpoint(spade, device="cpu")([Image.open(label)], style="random", num_styles=2, seed=3)
    assert len(items) == 3 and status == "1 map(s) x 2 style(s)" and "seed 4" in items[2][1]
    for (img, _), exp in zip(items[1:], ref.images[0]):
        assert (pixels(img) == pixels(exp)).all()
    assert app.synthesize_maps(models, [str(label)], "random", 0, 3)[1].startswith("error: num_styles=0")

    plain = app.load(app_config([f"ckpt={ckpts['plain']}", "device=cpu", f"output={tmp_path}"]))
    page, _ = app.build_page(plain, cfg)
    ids = {c.get("props", {}).get("elem_id") for c in page.config["components"]}
    assert not plain.captioning and {"t2i-caption-absent", "t2i-layout-absent"} <= ids
    assert "t2i-caption-files" not in ids
