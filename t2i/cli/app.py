"""t2i-app: a local web page over the pipeline (Gradio), the models loaded once at start.

    t2i-app ckpt=<run>/checkpoints/best.ckpt rerank.ckpt=<clip run>/checkpoints/best.ckpt
    t2i-app demo=outputs/demo port=8080

Three tabs. **Generate**: captions (one a line, Chinese or English as the model was trained), the number of
candidates, top-k, top-p, temperature, guidance scale, seed (and a button for a random one), reranking on or
off; the result is a grid per prompt, best first, each image under its score and seed, a table of the scores
(CLIP, caption likelihood) and a zip of the request's files, exactly the ones ``t2i-generate`` writes
(``Generation.save``: PNGs, grids, ``samples.jsonl``). The same settings and seed give the same images as
``t2i-generate``. **Caption** (a checkpoint trained with ``model.model.captioning=true``): images -> captions,
greedy or beam search. **Layout** (with ``spade.ckpt``): label maps -> one image per style. A tab whose model
is absent says what it needs.

The page is served on ``host:port`` (127.0.0.1: this machine only). Requests wait in one queue and run
``concurrency`` at a time. A setting that cannot work shows the one line ``t2i-generate`` prints for it, in the
page, and the server goes on serving; a missing or wrong checkpoint stops the app at start with one line.
Each request's files are kept under ``<output>/requests/``.
"""

from __future__ import annotations

import html
import itertools
import logging
import os
import random
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

from t2i.cli.common import clear_errors, one_line
from t2i.errors import ConfigError, T2IError

log = logging.getLogger("t2i.app")
METHODS = ("greedy", "beam")
STYLES = ("random", "mean")
SEED_RANGE = 2**31 - 1
GALLERY_COLUMNS = 4
CSS = """
#t2i-results, #t2i-captions {width: 100%; font-size: 0.8em; border-collapse: collapse}
#t2i-results td, #t2i-results th, #t2i-captions td, #t2i-captions th {padding: 2px 6px; border: 1px solid #ddd}
#t2i-random-seed {align-self: end}
#t2i-gallery img {image-rendering: pixelated}
"""


# -- models, loaded once --------------------------------------------------------------------------------------
@dataclass
class Models:
    pipe: object                       # t2i.pipeline.Pipeline
    synth: object | None = None        # t2i.pipeline.Synthesizer (spade.ckpt)
    captioning: bool = False           # the transformer has an image -> text direction
    notes: dict = field(default_factory=dict)


def checkpoints(cfg: DictConfig) -> tuple[str, str | None]:
    """``(transformer, reranker)`` files: ``ckpt`` / ``rerank.ckpt``, else those of the ``demo`` folder."""
    ckpt, rr = cfg.ckpt or None, cfg.rerank.get("ckpt") or None
    if cfg.get("demo") and (ckpt is None or rr is None):
        from t2i.cli.demo import best_checkpoint, train_done

        demo = Path(str(cfg.demo)).expanduser()
        if not train_done(demo / "transformer").exists():
            raise ConfigError(f"demo={cfg.demo} holds no trained transformer (no {demo / 'transformer/metrics.json'}): "
                              "run `make demo` first, or pass ckpt=<a transformer .ckpt>")
        ckpt = ckpt or best_checkpoint(demo / "transformer")
        if rr is None and cfg.rerank.get("backend", "t2i") == "t2i" and train_done(demo / "clip").exists():
            rr = best_checkpoint(demo / "clip")
    if ckpt is None:
        raise ConfigError("no model: pass demo=<a t2i-demo output folder> (what `make app` serves after `make demo`), "
                          "or ckpt=<a transformer .ckpt or t2i-import file>")
    return str(ckpt), rr


def check_start(cfg: DictConfig) -> None:
    """Settings of the app itself that cannot work, before any model loads (one ConfigError naming the key)."""
    from t2i.pipeline import Pipeline

    for key in ("port", "concurrency", "max_queue", "max_samples"):
        v = cfg.get(key)
        low = 1 if key != "port" else 0
        if isinstance(v, bool) or not isinstance(v, int) or v < low or (key == "port" and v > 65535):
            rule = "an integer in 0..65535 (0: a free one)" if key == "port" else f"an integer >= {low}"
            raise ConfigError(f"{key}={v} must be {rule}")
    if not isinstance(cfg.host, str) or not cfg.host:
        raise ConfigError(f"host={cfg.host} must be an address such as 127.0.0.1")
    Pipeline.check(cfg.num_samples, cfg.batch_size, cfg.top_k, cfg.top_p, cfg.temperature, cfg.cfg_scale)
    if cfg.caption.method not in METHODS:
        raise ConfigError(f"caption.method={cfg.caption.method} must be one of {', '.join(METHODS)}")


def load(cfg: DictConfig) -> Models:
    from t2i.cli.generate import reranker
    from t2i.pipeline import Pipeline, Synthesizer

    ckpt, rr_ckpt = checkpoints(cfg)
    _, backend, combine = reranker(cfg.rerank)
    sr = cfg.get("sr") or {}
    pipe = Pipeline.from_checkpoint(
        ckpt, reranker=rr_ckpt if backend != "caption" else "caption", reranker_backend=backend,
        reranker_model_name=cfg.rerank.get("model_name"), combine=combine, upscaler=sr.get("ckpt") or None,
        upscale_scale=sr.get("scale"), upscale_tile=int(sr.get("tile", 0)), upscale_tile_pad=int(sr.get("tile_pad", 10)),
        image_tokenizer=cfg.image_tokenizer or None, text_tokenizer=cfg.text_tokenizer or None,
        device=str(cfg.device), ema=bool(cfg.ema))
    synth = None
    if cfg.spade.get("ckpt"):
        try:
            synth = Synthesizer.from_checkpoint(cfg.spade.ckpt, device=str(cfg.device))
        except T2IError as e:  # the Synthesizer names its argument "path"; the user wrote spade.ckpt
            raise type(e)(str(e).replace("path=", "spade.ckpt=", 1)) from None
    models = Models(pipe, synth, captioning=bool(getattr(pipe.model, "captioning", False)))
    models.notes["ckpt"], models.notes["rerank"] = ckpt, rr_ckpt
    return models


# -- the requests (plain functions of the page's values; the page wires them) ----------------------------------
def as_number(v):
    """A number field's value as the command line gives it: ``2.0`` -> ``2``."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def setting(key: str, text):
    """A text field read as Hydra reads ``key=<text>`` on the command line (``2`` an int, ``0.9`` a float,
    ``null`` None, ``abc`` a string), so a value that cannot work gets the command's own message; empty: None."""
    if text is None or isinstance(text, (int, float)):
        return as_number(text)
    text = str(text).strip()
    if not text:
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_override(f"{key}={text}").value()
    except Exception:  # noqa: BLE001 - any parse failure is the user's text
        raise ConfigError(f"{key}={text} cannot be read as a value") from None


def page_prompts(text) -> list[str]:
    from t2i.data.prompts import prompt_list

    lines = [ln.strip() for ln in str(text or "").splitlines() if ln.strip()]
    if not lines:
        raise ConfigError("no prompts: write one caption a line")
    return prompt_list(lines)


class Requests:
    """Numbered folders ``<output>/requests/0001 ..`` for the requests' files."""

    def __init__(self, output):
        self.root = Path(str(output)) / "requests"
        self.count = itertools.count(1)
        self.lock = threading.Lock()

    def folder(self) -> Path:
        with self.lock:
            n = next(self.count)
        return self.root / f"{n:04d}"


def score_text(r: dict) -> str:
    parts = []
    if r.get("clip_score") is not None:
        parts.append(f"CLIP {r['clip_score']:.4f}")
    if r.get("caption_score") is not None:
        parts.append(f"caption {r['caption_score']:.4f}")
    if r.get("combined") is not None:
        parts.append(f"combined {r['combined']:.4f}")
    if not parts and r.get("score") is not None:
        parts.append(f"score {r['score']:.4f}")
    return " · ".join(parts) or "not reranked"


def results_table(records: list[dict]) -> str:
    """An HTML table, one row per image (best first per prompt): what samples.jsonl holds, to read."""
    def num(v):
        return "" if v is None else f"{v:.6f}"

    rows = "".join(
        f"<tr data-prompt='{r['prompt_index']}' data-sample='{r['sample']}'><td>{r['prompt_index']}</td>"
        f"<td>{html.escape(r['prompt'])}</td><td>{r['sample'] + 1}</td><td>{r['drawn']}</td>"
        f"<td class='score'>{num(r['score'])}</td><td class='clip'>{num(r['clip_score'])}</td>"
        f"<td class='caption'>{num(r['caption_score'])}</td><td class='seed'>{r['seed']}</td>"
        f"<td>{html.escape(r['file'])}</td></tr>" for r in records)
    head = ("<tr><th>#</th><th>prompt</th><th>rank</th><th>drawn</th><th>score</th><th>CLIP score</th>"
            "<th>caption score</th><th>seed</th><th>file</th></tr>")
    return f"<table id='t2i-results'><thead>{head}</thead><tbody>{rows}</tbody></table>"


def generate(models: Models, cfg: DictConfig, requests: Requests, prompts_text, num_samples, top_k, top_p,
             temperature, cfg_scale, seed, rerank, progress=None):
    """``(gallery items, results table, zip file, status line)``; a T2IError becomes ``error: <message>`` in the
    status line (the line t2i-generate prints) and an empty result."""
    try:
        prompts = page_prompts(prompts_text)
        n, top_k, top_p = setting("num_samples", num_samples), setting("top_k", top_k), setting("top_p", top_p)
        temperature, cfg_scale, seed = setting("temperature", temperature), setting("cfg_scale", cfg_scale), \
            setting("seed", seed)
        if seed is None or isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"seed={seed} must be an integer")
        if temperature is None:
            raise ConfigError("temperature=null must be a number >= 0 (0 is greedy)")
        if isinstance(n, int) and n > int(cfg.max_samples):
            raise ConfigError(f"num_samples={n} is more than this page takes (max_samples={cfg.max_samples}); "
                              "restart the app with a larger max_samples")
        models.pipe.check(n, int(cfg.batch_size), top_k, top_p, temperature, cfg_scale)

        def report(done, total):
            if progress is not None:
                progress((done, total), desc="sampling", unit="prompts")

        report(0, len(prompts))
        out = models.pipe(prompts, n, top_k=top_k, top_p=top_p, temperature=float(temperature), cfg_scale=cfg_scale,
                          seed=int(seed), batch_size=int(cfg.batch_size), rerank=bool(rerank),
                          use_cache=bool(cfg.use_cache), allow_unk=bool(cfg.allow_unk), progress=report)
        folder = out.save(requests.folder())
        archive = shutil.make_archive(str(folder), "zip", root_dir=folder)
    except T2IError as e:
        return [], "", None, f"error: {one_line(e)}"
    items = [(str(folder / r["file"]), f"#{r['sample'] + 1} · {score_text(r)} · seed {r['seed']}")
             for r in out.records]
    status = (f"{len(out.records)} images for {len(prompts)} prompt(s) in {out.seconds:.1f} s"
              f"{', best first' if out.reranked else ''}; files in {folder}")
    return items, results_table(out.records), archive, status


def open_images(files) -> tuple[list, list[str]]:
    from PIL import Image

    if not files:
        raise ConfigError("no images: upload one or more")
    paths = [str(f if isinstance(f, (str, Path)) else getattr(f, "name", f)) for f in files]
    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im.load()
                out.append(im.copy())
        except OSError as e:
            raise ConfigError(f"{Path(p).name} is not an image ({e})") from None
    return out, paths


def caption_images(models: Models, cfg: DictConfig, files, method):
    """``(gallery items, table, status)`` for uploaded images."""
    try:
        if method not in METHODS:
            raise ConfigError(f"caption.method={method} must be one of {', '.join(METHODS)}")
        images, paths = open_images(files)
        captions = models.pipe.caption(images, method=method, beam_size=int(cfg.caption.beam_size))
    except T2IError as e:
        return [], "", f"error: {one_line(e)}"
    rows = "".join(f"<tr><td>{html.escape(Path(p).name)}</td><td class='caption'>{html.escape(c)}</td></tr>"
                   for p, c in zip(paths, captions))
    table = f"<table id='t2i-captions'><thead><tr><th>image</th><th>caption</th></tr></thead><tbody>{rows}</tbody></table>"
    return list(zip(paths, captions)), table, f"{len(captions)} caption(s), {method}"


def synthesize_maps(models: Models, files, style, num_styles, seed):
    """``(gallery items, status)``: per uploaded label map, the map in colour, then its images per style."""
    from t2i.pipeline.spade import colorize_map, label_tensor
    from t2i.pipeline.text_to_image import to_pil

    try:
        if style not in STYLES:
            raise ConfigError(f"style={style} must be one of {', '.join(STYLES)}")
        seed = as_number(seed)
        if seed is None or not isinstance(seed, int):
            raise ConfigError(f"seed={seed} must be an integer")
        maps, paths = open_images(files)
        synth = models.synth
        out = synth(maps, style="random" if style == "random" else None, num_styles=as_number(num_styles), seed=seed)
        labels = label_tensor(maps, synth.num_classes, synth.size)
        coloured = to_pil((colorize_map(labels, synth.num_classes) + 1) / 2)
    except T2IError as e:
        return [], f"error: {one_line(e)}"
    items = []
    for i, p in enumerate(paths):
        items.append((coloured[i], f"{Path(p).name}: the map"))
        for k, img in enumerate(out.images[i]):
            kind, what = out.styles[k]
            items.append((img, f"{Path(p).name}: style {k}" + (f" (seed {what})" if kind == "random" else f" ({kind})")))
    return items, f"{len(paths)} map(s) x {len(out.styles)} style(s)"


def shown(value) -> str:
    """A setting as its text field shows it (None: empty)."""
    return "" if value is None else str(value)


# -- the page --------------------------------------------------------------------------------------------------
def build_page(models: Models, cfg: DictConfig):
    import gradio as gr

    requests = Requests(cfg.output)
    pipe = models.pipe
    prompts = cfg.prompts
    if isinstance(prompts, ListConfig):
        prompts = OmegaConf.to_container(prompts)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts or [])

    # Gradio's copies of served files older than a day go, checked daily (the requests' own folders stay)
    with gr.Blocks(title="t2i", analytics_enabled=False, delete_cache=(86400, 86400)) as page:
        gr.Markdown(f"## t2i\n`{models.notes['ckpt']}` on {pipe.device}"
                    + (f" · reranker: {pipe.reranking.name}" if pipe.reranking.active else " · no reranker"))
        with gr.Tab("Generate", id="generate"):
            with gr.Row():
                with gr.Column(scale=1):
                    text = gr.Textbox("\n".join(prompts), lines=3, label="captions (one a line)",
                                      placeholder="一个大的红色圆形在左上角", elem_id="t2i-prompts")
                    with gr.Row():
                        n = gr.Number(int(cfg.num_samples), label="candidates per caption", precision=0,
                                      elem_id="t2i-num-samples")
                        top_k = gr.Textbox(shown(cfg.top_k), label="top-k (empty: none)", elem_id="t2i-top-k")
                        top_p = gr.Textbox(shown(cfg.top_p), label="top-p (empty: none)", elem_id="t2i-top-p")
                    with gr.Row():
                        temperature = gr.Number(float(cfg.temperature), label="temperature", step=0.1,
                                                elem_id="t2i-temperature")
                        cfg_scale = gr.Textbox(shown(cfg.cfg_scale), label="guidance scale (empty: none)",
                                               elem_id="t2i-cfg-scale")
                        seed = gr.Number(int(cfg.seed), label="seed", precision=0, elem_id="t2i-seed")
                        dice = gr.Button("random seed", elem_id="t2i-random-seed", scale=0, size="sm")
                    rerank = gr.Checkbox(pipe.reranking.active, label=f"rerank ({pipe.reranking.name})"
                                         if pipe.reranking.active else "rerank (no reranker loaded)",
                                         interactive=pipe.reranking.active, elem_id="t2i-rerank")
                    go = gr.Button("Generate", variant="primary", elem_id="t2i-generate")
                with gr.Column(scale=2):
                    status = gr.Markdown("", elem_id="t2i-status")
                    gallery = gr.Gallery(label="best first", columns=min(GALLERY_COLUMNS, int(cfg.num_samples)), format="png",
                                         object_fit="contain", elem_id="t2i-gallery", interactive=False)
                    download = gr.File(label="images + samples.jsonl (zip)", elem_id="t2i-download",
                                       interactive=False)
                    table = gr.HTML("", elem_id="t2i-table")
            dice.click(lambda: random.randint(0, SEED_RANGE), outputs=seed, queue=False)

            def on_generate(prompts_text, num_samples, k, p, temp, guidance, s, rr, progress=gr.Progress()):  # noqa: B008 (Gradio's way)
                items, rows, archive, line = generate(models, cfg, requests, prompts_text, num_samples, k, p, temp,
                                                      guidance, s, rr, progress)
                n = as_number(num_samples)
                columns = min(GALLERY_COLUMNS, n) if isinstance(n, int) and n > 0 else GALLERY_COLUMNS
                return gr.Gallery(value=items, columns=columns), rows, archive, line

            go.click(on_generate, inputs=[text, n, top_k, top_p, temperature, cfg_scale, seed, rerank],
                     outputs=[gallery, table, download, status], api_name="generate")

        with gr.Tab("Caption", id="caption"):
            if models.captioning:
                with gr.Row():
                    with gr.Column():
                        cap_files = gr.File(file_count="multiple", file_types=["image"], label="images",
                                            elem_id="t2i-caption-files")
                        method = gr.Radio(list(METHODS), value=str(cfg.caption.method), label="search",
                                          elem_id="t2i-caption-method")
                        cap_go = gr.Button("Caption", variant="primary", elem_id="t2i-caption")
                    with gr.Column():
                        cap_status = gr.Markdown("", elem_id="t2i-caption-status")
                        cap_gallery = gr.Gallery(label="captions", columns=4, format="png", interactive=False)
                        cap_table = gr.HTML("", elem_id="t2i-caption-table")
                cap_go.click(lambda f, m: caption_images(models, cfg, f, m), inputs=[cap_files, method],
                             outputs=[cap_gallery, cap_table, cap_status], api_name="caption")
            else:
                gr.Markdown("This transformer has no image → text direction: captioning needs a checkpoint trained "
                            "with `model.model.captioning=true` (e.g. `experiment=shapes_bidirectional`).",
                            elem_id="t2i-caption-absent")

        with gr.Tab("Layout", id="layout"):
            if models.synth is not None:
                with gr.Row():
                    with gr.Column():
                        map_files = gr.File(file_count="multiple", file_types=["image"],
                                            label=f"label maps (one class id a pixel, 0..{models.synth.num_classes - 1})",
                                            elem_id="t2i-layout-files")
                        style = gr.Radio(list(STYLES), value="random", label="style (mean: one image per map)")
                        num_styles = gr.Number(int(cfg.spade.num_styles), label="styles", precision=0, minimum=1)
                        lseed = gr.Number(int(cfg.seed), label="seed (style k: seed + k)", precision=0)
                        lay_go = gr.Button("Synthesize", variant="primary", elem_id="t2i-synthesize")
                    with gr.Column():
                        lay_status = gr.Markdown("", elem_id="t2i-layout-status")
                        lay_gallery = gr.Gallery(label="map, then its styles", columns=int(cfg.spade.num_styles) + 1,
                                                 format="png", interactive=False)
                lay_go.click(lambda f, s, k, sd: synthesize_maps(models, f, s, k, sd),
                             inputs=[map_files, style, num_styles, lseed], outputs=[lay_gallery, lay_status],
                             api_name="layout")
            else:
                gr.Markdown("No SPADE checkpoint loaded: start the app with `spade.ckpt=<a t2i-train "
                            "experiment=*_spade .ckpt>` for label maps → images.", elem_id="t2i-layout-absent")
    page.queue(max_size=int(cfg.max_queue), default_concurrency_limit=int(cfg.concurrency))
    return page, requests


def free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve(cfg: DictConfig, block: bool = True):
    """Check, load the models once, build the page and serve it; returns ``(page, url)`` when not ``block``."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    check_start(cfg)
    models = load(cfg)
    page, requests = build_page(models, cfg)
    requests.root.mkdir(parents=True, exist_ok=True)
    import gradio as gr

    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own start-up probes
    try:
        _, url, _ = page.launch(server_name=str(cfg.host), server_port=int(cfg.port) or free_port(str(cfg.host)),
                                prevent_thread_lock=True, inbrowser=bool(cfg.open_browser), quiet=True,
                                show_error=False, ssr_mode=False, allowed_paths=[str(requests.root.resolve())],
                                footer_links=[], theme=gr.themes.Default(), css=CSS)
    except OSError as e:
        log.debug("launch failed: %s", e)
        raise ConfigError(f"port={cfg.port} on {cfg.host} is taken or cannot be bound: give another port "
                          "(port=0 takes a free one)") from None
    print(f"t2i-app: serving {url} ({models.notes['ckpt']} on {models.pipe.device}); Ctrl+C stops it", flush=True)
    if block:
        try:
            page.block_thread()
        except KeyboardInterrupt:
            pass
        finally:
            page.close()
    return page, url


@hydra.main(version_base="1.3", config_path="../conf", config_name="app")
@clear_errors
def main(cfg: DictConfig) -> None:
    OmegaConf.resolve(cfg)
    serve(cfg)


if __name__ == "__main__":
    main()
