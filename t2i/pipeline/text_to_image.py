"""``Pipeline``: a transformer checkpoint loaded once, called many times -- prompts in, images out.

    from t2i import Pipeline
    pipe = Pipeline.from_checkpoint("runs/shapes_transformer/.../best.ckpt", reranker="runs/shapes_clip/.../best.ckpt")
    out = pipe(["一个大的红色圆形在左上角", "a small blue square at the bottom"], num_samples=8, top_k=4, seed=0)
    out.images[0][0].save("best.png")      # PIL images, best first per prompt
    out.save("samples/")                    # the files t2i-generate writes: PNGs, grids, samples.jsonl

``t2i-generate`` is this class behind a config: the same settings and seed give the same images. Prompts
are sampled ``batch_size // num_samples`` at a time, each batch from a generator seeded with ``seed +
index of its first prompt`` (recorded per image): another ``batch_size`` gives other, equally valid samples.
With a reranker the ``num_samples`` candidates of a prompt are ordered best first (``drawn``: a candidate's
position among those sampled); ``top`` keeps the best ones. Every setting is checked where it arrives,
with the one-line :class:`~t2i.errors.ConfigError` the commands print.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from t2i.data.prompts import check_output_folder, prompt_list
from t2i.devices import autocast_dtype, pick_device
from t2i.errors import ConfigError
from t2i.pipeline.parts import encode_prompts, load_checkpoint, load_parts
from t2i.pipeline.rerank import Reranking
from t2i.pipeline.upscale import check_upscale, load_upscaler, upscale_images
from t2i.sampling import DEFAULT_TOP_K

SETTINGS = ("top_k", "top_p", "temperature", "cfg_scale", "use_cache", "ema")


def to_pil(pics: torch.Tensor) -> list[Image.Image]:
    """``[N, 3, H, W]`` in [0, 1] -> PIL images, rounded as ``torchvision.utils.save_image`` rounds."""
    arr = pics.detach().float().mul(255).add_(0.5).clamp_(0, 255).permute(0, 2, 3, 1).to("cpu", torch.uint8).numpy()
    return [Image.fromarray(a) for a in arr]


def from_pil(images, size: int | None = None) -> torch.Tensor:
    """PIL images (or a tensor ``[N, 3, H, W]``: float in [0, 1], or uint8) -> ``[N, 3, S, S]`` in [-1, 1]; PIL
    images are resized (shorter side) and centre-cropped to ``size`` when given."""
    if isinstance(images, torch.Tensor):
        x = images if images.dim() == 4 else images[None]
        return x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x.float() * 2 - 1
    if isinstance(images, Image.Image):
        images = [images]
    from t2i.data.transforms import ImageTransform

    out = []
    for im in images:
        im = im.convert("RGB")
        if size is not None:
            arr = ImageTransform(size, raw=True)(im)
        else:
            import numpy as np

            arr = np.asarray(im)
        out.append(torch.as_tensor(arr).permute(2, 0, 1))
    return torch.stack(out).float() / 127.5 - 1


def check_count(key: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"{key}={v} must be an integer >= 1")
    return v


@dataclass
class Generation:
    """What one call made. Per prompt, best first: ``images`` (PIL), ``scores`` (the ranking score, None
    without a reranker), ``codes`` (``[k, h, w]``); ``records`` are the ``samples.jsonl`` rows (one per
    image, in file order); ``settings`` the sampling settings; ``pixels`` the ``[k, 3, H, W]`` tensors in
    [0, 1] the images were made from."""

    prompts: list[str]
    images: list[list[Image.Image]]
    scores: list[list[float | None]]
    codes: list[torch.Tensor]
    pixels: list[torch.Tensor]
    records: list[dict]
    settings: dict
    seconds: float = 0.0
    reranked: bool = False
    extra: dict = field(default_factory=dict)

    def save(self, folder, grids: bool = True) -> Path:
        """Write ``p{prompt:03d}_s{sample:02d}.png`` per image, ``grid_p{prompt:03d}.png`` per prompt (the
        reranked pick in a red frame) and ``samples.jsonl``: the files ``t2i-generate`` writes."""
        from t2i.viz import sample_grid

        out = check_output_folder(folder)
        out.mkdir(parents=True, exist_ok=True)
        rows = iter(self.records)
        for i, imgs in enumerate(self.images):
            for img in imgs:
                img.save(out / next(rows)["file"])
            if grids and imgs:
                grid = sample_grid(self.pixels[i], nrow=min(8, len(imgs)), marked=[0] if self.reranked else [])
                to_pil(grid[None])[0].save(out / f"grid_p{i:03d}.png")
        with open(out / "samples.jsonl", "w", encoding="utf-8") as f:
            for r in self.records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        return out


class Pipeline:
    """A transformer with its image tokenizer, text tokenizer, entity linker (ARTIST) and, optionally, a
    reranker and an upscaler; see the module docstring. Build it with :meth:`from_checkpoint`."""

    def __init__(self, model, image_tokenizer, text_tokenizer, linker=None, reranking: Reranking | None = None,
                 upscaler=None, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                 ema: bool = True, source: str | None = None, upscale_tile: int = 0, upscale_tile_pad: int = 10,
                 upscaler_file: str | None = None, decode_dtype: torch.dtype | None = None):
        self.model, self.image_tokenizer, self.text_tokenizer, self.linker = model, image_tokenizer, text_tokenizer, linker
        self.reranking = reranking or Reranking()
        self.upscaler, self.upscale_tile, self.upscale_tile_pad = upscaler, upscale_tile, upscale_tile_pad
        self.upscaler_file = upscaler_file
        self.device, self.dtype, self.ema, self.source = torch.device(device), dtype, ema, source
        self.decode_dtype = dtype if decode_dtype is None else decode_dtype  # torch.float32: no autocast

    @classmethod
    def from_checkpoint(cls, path, reranker=None, reranker_backend: str = "t2i", reranker_model_name: str | None = None,
                        combine: str | None = None, upscaler=None, upscale_scale: int | None = None,
                        upscale_tile: int = 0, upscale_tile_pad: int = 10, image_tokenizer=None, text_tokenizer=None,
                        device="auto", dtype=None, ema: bool = True, decode_dtype=None) -> Pipeline:
        """Load a transformer checkpoint (``t2i-train experiment=*_transformer``, or a ``t2i-import`` file of
        EasyNLP pai-painter / ARTIST or ruDALL-E) with what it carries.

        ``reranker``: our CLIP ``.ckpt`` (``reranker_backend="t2i"``), an open_clip / cn_clip weights file
        (``reranker_backend`` and ``reranker_model_name``), ``"caption"`` (the transformer's own caption
        likelihood; a ``model.model.captioning=true`` checkpoint) or a loaded reranker module; ``combine``
        (``rank_sum`` | ``zsum``) ranks by a CLIP and the caption likelihood together. ``upscaler``: a
        Real-ESRGAN ``.pth`` or ``t2i-import realesrgan`` file (``upscale_scale``: must be its own scale;
        ``upscale_tile`` > 0 runs tiles of that many pixels). ``image_tokenizer`` / ``text_tokenizer``
        override what the checkpoint carries. ``device``: auto | cpu | cuda[:N]; ``dtype``: autocast
        (``torch.bfloat16``, ``"bf16"``, ``"fp16"`` on a GPU; None: float32); ``decode_dtype``: the same for
        the image tokenizer's decode alone (None: as ``dtype``; ``"fp32"``: no autocast; ``"bf16"`` decodes a 256 px VQGAN about 1.9x
        faster on a CPU with AVX512-BF16, see ``experiments/tokenizer_speed/RESULTS_decode.md``); ``ema``:
        sample with the EMA weights when the checkpoint has them."""
        device = pick_device(device)
        dtype = autocast_dtype(dtype, device, key="dtype")
        decode_dtype = dtype if decode_dtype is None else \
            autocast_dtype(decode_dtype, device, key="decode_dtype") or torch.float32
        check_upscale(upscaler, upscale_scale, upscale_tile, upscale_tile_pad)
        reranking = Reranking.check(reranker, reranker_backend, combine)
        ckpt = load_checkpoint(path)  # every file setting is checked before the model is built
        parts = load_parts(path, device, ema, image_tokenizer, text_tokenizer, ckpt=ckpt)
        reranking = reranking.load(parts.model, reranker_model_name, device, where=f"ckpt={path}")
        up = load_upscaler(upscaler, upscale_scale, device)
        return cls(parts.model, parts.image_tokenizer, parts.text_tokenizer, parts.linker, reranking, up, device,
                   dtype, ema, source=str(path), upscale_tile=upscale_tile, upscale_tile_pad=upscale_tile_pad,
                   upscaler_file=None if up is None else str(upscaler), decode_dtype=decode_dtype)

    # -- the steps, each usable on its own ----------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return int(self.image_tokenizer.downsample * self.model.grid[0])

    def _autocast(self, dtype: torch.dtype | None = None):
        dtype = self.dtype if dtype is None else dtype
        if dtype is None or dtype == torch.float32:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=dtype)

    def encode_text(self, prompts, allow_unk: bool = False) -> torch.Tensor:
        """``[len(prompts), text_len]`` token ids for the model (one warning for unknown pieces; a prompt
        mostly of [UNK] is an error unless ``allow_unk``)."""
        return encode_prompts(self.text_tokenizer, prompt_list(prompts), self.model.text_len, allow_unk)

    def sample_codes(self, prompts, num_samples: int = 1, top_k: int | None = DEFAULT_TOP_K, top_p: float | None = None,
                     temperature: float = 1.0, cfg_scale: float | None = None, use_cache: bool = True,
                     generator: torch.Generator | None = None, seed: int | None = None, allow_unk: bool = False,
                     progress: bool = False) -> torch.Tensor:
        """Code grids ``[len(prompts) * num_samples, h, w]`` (the samples of prompt ``b`` are rows ``b *
        num_samples ..``); ``prompts``: strings, or token ids ``[B, text_len]`` (a model with knowledge
        needs the strings, to link their entities)."""
        if isinstance(prompts, torch.Tensor):
            if self.linker is not None:
                raise ConfigError("this model links prompt entities (knowledge): pass the prompts as strings, not ids")
            ids, texts = prompts, None
        else:
            texts = prompt_list(prompts)
            ids = self.encode_text(texts, allow_unk)
        if generator is None and seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(int(seed))
        return self._sample(ids, texts, num_samples, top_k, top_p, temperature, cfg_scale, use_cache, generator,
                            progress)

    def _sample(self, ids, texts, num_samples, top_k, top_p, temperature, cfg_scale, use_cache, generator,
                progress=False) -> torch.Tensor:
        from t2i.sampling import generate

        entities = self.linker(texts) if self.linker is not None else None
        with self._autocast():
            return generate(self.model, ids.to(self.device), int(num_samples), top_k=top_k, top_p=top_p,
                            temperature=float(temperature), cfg_scale=cfg_scale, use_cache=bool(use_cache),
                            generator=generator, entities=entities, progress=progress)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Images ``[N, 3, H, W]`` in [0, 1] from code grids ``[N, h, w]``."""
        from t2i.sampling import decode_codes

        with self._autocast(self.decode_dtype):
            return (decode_codes(self.image_tokenizer, codes).float().clamp(-1, 1) + 1) / 2

    @torch.no_grad()
    def tokenize(self, images) -> torch.Tensor:
        """Code grids ``[N, h, w]`` of images (PIL, resized and centre-cropped to the model's resolution; or
        a tensor ``[N, 3, H, W]`` at that resolution: float in [0, 1], or uint8)."""
        x = from_pil(images, self.image_size).to(self.device)
        with self._autocast():
            return self.image_tokenizer.encode(x).cpu()

    def score(self, images, texts) -> torch.Tensor:
        """The reranker's score ``[N]`` of each (image, text) pair (``texts``: one string for all or one per
        image); images as PIL or ``[N, 3, H, W]`` in [0, 1]. Needs a CLIP reranker."""
        if self.reranking.clip is None:
            raise ConfigError("score() needs a CLIP: build the pipeline with reranker=<a CLIP .ckpt>")
        from t2i.pipeline.rerank import score

        return score(self.reranking.clip, from_pil(images, None), texts)

    def caption(self, images, method: str = "beam", beam_size: int = 4, length_penalty: float = 1.0,
                top_k: int | None = None, top_p: float | None = None, temperature: float = 1.0,
                use_cache: bool = True, seed: int = 0, batch_size: int = 32) -> list[str]:
        """Captions of images (PIL, or ``[N, 3, H, W]`` float in [0, 1] or uint8) by a captioning checkpoint
        (``model.model.captioning=true``): ``method`` greedy | beam | sample (:func:`t2i.captioning.caption`);
        images ``a .. a + batch_size`` are captioned with a generator seeded ``seed + a``."""
        from t2i.captioning import caption

        self.model._need_captioning()
        codes = self.tokenize(images)
        out = []
        for a in range(0, len(codes), int(batch_size)):
            gen = torch.Generator(device=self.device).manual_seed(int(seed) + a)
            with self._autocast():
                ids = caption(self.model, codes[a:a + int(batch_size)].to(self.device), method=method,
                              beam_size=beam_size, length_penalty=length_penalty, top_k=top_k, top_p=top_p,
                              temperature=temperature, use_cache=use_cache, generator=gen)
            out += list(self.text_tokenizer.decode(ids.cpu()))
        return out

    # -- the whole chain ---------------------------------------------------------------------------------
    @staticmethod
    def check(num_samples=4, batch_size=32, top_k=DEFAULT_TOP_K, top_p=None, temperature=1.0, cfg_scale=None,
              top=None) -> None:
        """One ConfigError for call settings that cannot work (before anything is sampled)."""
        from t2i.sampling import check_sampling

        check_count("num_samples", num_samples)
        check_count("batch_size", batch_size)
        check_sampling(num_samples, top_k, top_p, temperature, cfg_scale)
        if top is not None:
            check_count("rerank.top", top)

    def __call__(self, prompts, num_samples: int = 4, *, top_k: int | None = DEFAULT_TOP_K, top_p: float | None = None,
                 temperature: float = 1.0, cfg_scale: float | None = None, seed: int = 0,
                 generator: torch.Generator | None = None, batch_size: int = 32, rerank: bool = True,
                 top: int | None = None, use_cache: bool = True, allow_unk: bool = False, progress=False) -> Generation:
        """Sample ``num_samples`` images per prompt, rank them (with a reranker and ``rerank``), keep ``top``
        of them (all when None), upscale them (with an upscaler). ``generator``: one generator for every
        batch instead of the per-batch ``seed + first prompt`` ones. ``progress``: a tqdm bar over prompts,
        or a callable ``progress(done, total)`` called after each batch."""
        self.check(num_samples, batch_size, top_k, top_p, temperature, cfg_scale, top)
        prompts = prompt_list(prompts)
        text = self.encode_text(prompts, allow_unk)
        rr = self.reranking if rerank else Reranking()
        settings = {"top_k": top_k, "top_p": top_p, "temperature": temperature, "cfg_scale": cfg_scale,
                    "use_cache": use_cache, "ema": self.ema}
        sr_info = None if self.upscaler is None else {"file": self.upscaler_file, "scale": self.upscaler.scale}
        n = int(num_samples)
        per_batch = max(1, int(batch_size) // n)
        out = Generation(prompts, [], [], [], [], [], settings, reranked=rr.active)
        t0 = time.perf_counter()
        bar = None
        if progress is True:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(prompts), desc="prompts")
        for start in range(0, len(prompts), per_batch):
            idx = list(range(start, min(start + per_batch, len(prompts))))
            gen = generator or torch.Generator(device=self.device).manual_seed(int(seed) + start)
            codes = self._sample(text[idx[0]:idx[-1] + 1], [prompts[i] for i in idx], n, top_k, top_p, temperature,
                                 cfg_scale, use_cache, gen)
            cap = rr.caption_table(self.model, codes, text[idx[0]:idx[-1] + 1], n)
            images = self.decode(codes) * 2 - 1  # the rerankers read [-1, 1]
            batch = [prompts[i] for i in idx]
            for k, (i, ranked) in enumerate(zip(idx, rr.rank(images, batch, cap, top))):
                pics = (images[k * n:(k + 1) * n][ranked.order] + 1) / 2
                if self.upscaler is not None:
                    pics = upscale_images(self.upscaler, pics, self.upscale_tile, self.upscale_tile_pad)
                pics = pics.cpu()
                out.images.append(to_pil(pics))
                out.pixels.append(pics)
                out.codes.append(codes[k * n:(k + 1) * n][ranked.order].cpu())
                out.scores.append(ranked.scores)
                for j, src in enumerate(ranked.order):
                    out.records.append({
                        "prompt": prompts[i], "prompt_index": i, "sample": j, "drawn": src,
                        "seed": None if generator is not None else int(seed) + start, "file": f"p{i:03d}_s{j:02d}.png",
                        "settings": settings, "score": ranked.scores[j], "reranked": rr.active, "sr": sr_info,
                        "clip_score": ranked.clip[j], "caption_score": ranked.caption[j],
                        "combined": ranked.combined[j], "rerank": rr.name})
            if bar is not None:
                bar.update(len(idx))
            elif callable(progress):
                progress(idx[-1] + 1, len(prompts))
        if bar is not None:
            bar.close()
        out.seconds = time.perf_counter() - t0
        return out
