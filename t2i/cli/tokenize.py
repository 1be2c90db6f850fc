"""t2i-tokenize: encode a dataset's images with a trained image tokenizer into code shards (stage 1 -> 2).

    t2i-tokenize tokenizer_ckpt=outputs/train/runs/<run>/checkpoints/last.ckpt data=shapes output=data/codes/shapes
    t2i-tokenize tokenizer_ckpt=vqgan.ckpt data=muge output=data/codes/muge split=train batch_size=128
    torchrun --nproc_per_node=8 -m t2i.cli.tokenize tokenizer_ckpt=vqgan.ckpt data=muge output=data/codes/muge
    t2i-tokenize tokenizer_kind=taming tokenizer_ckpt=vqgan_imagenet_f16_16384/checkpoints/last.ckpt data=muge ...
    t2i-tokenize tokenizer_kind=openai_dvae tokenizer_ckpt=encoder.pkl tokenizer_decoder=decoder.pkl data=muge ...

``data=`` is the same config group as ``t2i-train`` (so ``data.image_size=...`` etc. work); images
get the evaluation transform (resize + centre crop, no random crop), each image is encoded once and
its shard record carries all of its captions. Output layout, sharding and the manifest: see
:mod:`t2i.data.codes`. The output folder can be moved: its manifest records the image tokenizer's
files (sha256, absolute and relative paths) and a copy of the text tokenizer sits beside it.

Resuming: a rerun with the same settings skips every finished shard (``resume=false`` re-encodes this
rank's shards). An output written with another tokenizer, image size, world size, shard size or a
changed data set is refused unless ``overwrite=true``, which first deletes the code shards and
manifests there.

Several processes: rank and world size come from ``RANK``/``WORLD_SIZE`` (default 0/1); rank ``r``
encodes records ``r::WORLD_SIZE`` into its own shards and state file ``manifest.rank{r}.json``.
``manifest.json`` is merged from the rank files by whichever rank finishes a split last (so ranks may
also run one after another, e.g. as a job array). Under ``torchrun`` (``MASTER_ADDR`` set) the ranks
also synchronise: rank 0 builds the data set first (Shapes) and merges the manifest after all ranks.
Without ``torchrun``, build a synthetic data set once before starting ranks concurrently.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import timedelta
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import nn

from t2i import checks
from t2i.cli.common import clear_errors
from t2i.data.codes import (
    MANIFEST,
    VERSION,
    code_dtype,
    merge_manifests,
    rank_files,
)
from t2i.data.encoding import Encoder, RankState, check_output, clear_output, encode_split
from t2i.data.skips import DataError
from t2i.devices import pick_device  # noqa: F401 (t2i-generate, -eval, -synthesize)
from t2i.errors import ConfigError

log = logging.getLogger("t2i.tokenize")
SPLITS = ("train", "val", "test")
KINDS = ("t2i", "taming", "openai_dvae")
# every key of conf/tokenize.yaml, checked before anything loads (the data= group checks its own keys)
KEYS = {
    "seed": checks.integer(), "tokenizer_ckpt": checks.file(what="image-tokenizer .ckpt"),
    "tokenizer_kind": checks.choice(*KINDS), "tokenizer_config": checks.file(optional=True, utf8=True, what="YAML"),
    "tokenizer_decoder": checks.file(optional=True, what="decoder.pkl"),
    "output": checks.output_folder(what="folder for the code shards"), "split": checks.choice(*SPLITS, "all"),
    "batch_size": checks.count(), "num_workers": checks.count(0), "device": checks.device(),
    "shard_size": checks.count(), "resume": checks.boolean(), "overwrite": checks.boolean(),
    "progress": checks.boolean(),
}


# -- setup ----------------------------------------------------------------------------------------


def rank_world() -> tuple[int, int]:
    """This process's rank and the number of processes, from RANK / WORLD_SIZE (torchrun sets both)."""
    try:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise ConfigError(f"RANK={os.environ.get('RANK')} WORLD_SIZE={os.environ.get('WORLD_SIZE')}: "
                          "must be integers") from None
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} WORLD_SIZE={world}: need WORLD_SIZE >= 1 and 0 <= RANK < WORLD_SIZE")
    return rank, world


def load_image_tokenizer(cfg: DictConfig, output=None) -> tuple[nn.Module, Path, dict]:
    """The image tokenizer ``tokenizer_kind`` names, the file that identifies it (hashed into the manifest)
    and its spec (every file: absolute path, sha256, path relative to ``output``), which the manifest
    records so that stage 2 finds and checks the same files (:func:`t2i.pretrained.load_tokenizer`).

    ``t2i``: our own checkpoint. ``taming`` / ``openai_dvae``: public weights through :mod:`t2i.pretrained`
    (``tokenizer_config``: the taming YAML, default the one beside the .ckpt; ``tokenizer_decoder``: the
    dVAE's decoder.pkl, with ``tokenizer_ckpt`` its encoder.pkl).
    """
    kind, ckpt = cfg.tokenizer_kind, cfg.tokenizer_ckpt
    if kind not in KINDS:
        raise ConfigError(f"tokenizer_kind={kind}: unknown; use one of {', '.join(KINDS)}")
    if not ckpt:
        raise ConfigError("t2i-tokenize: `tokenizer_ckpt=...` is required (a .ckpt from "
                          "`t2i-train experiment=*_vqgan` or *_dvae)")
    path = Path(str(ckpt)).expanduser()
    if not path.is_file():
        raise ConfigError(f"tokenizer_ckpt={ckpt}: no such file (give a .ckpt from `t2i-train experiment=*_vqgan` "
                          "or *_dvae)")
    from t2i.pretrained.image_tokenizers import load_tokenizer, tokenizer_spec

    spec = tokenizer_spec(kind, path, cfg.get("tokenizer_config"), cfg.get("tokenizer_decoder"),
                          relative_to=output,
                          names={"ckpt": "tokenizer_ckpt", "config": "tokenizer_config", "decoder": "tokenizer_decoder"})
    model = load_tokenizer(spec, key="tokenizer_ckpt", check_hash=False,  # hashed just now
                           hint="set tokenizer_kind=taming (and tokenizer_config=<its model.yaml>) or "
                                "tokenizer_kind=openai_dvae (and tokenizer_decoder=<decoder.pkl>)")
    for attr in ("codebook_size", "downsample"):
        if not isinstance(getattr(model, attr, None), int):
            raise ConfigError(f"tokenizer_ckpt={ckpt}: {type(model).__name__} has no integer `{attr}`; it does not "
                              "follow the image-tokenizer contract (t2i.models)")
    return model.eval(), path, spec


def embed_text_tokenizer(cfg: DictConfig, out: Path) -> dict:
    """Manifest entries naming the data config's text tokenizer so a moved code folder keeps it: a copy
    ``text_tokenizer.json`` beside the manifest (when the file exists now) and its absolute path and
    path relative to ``out``."""
    from t2i.data.tokenizer import TextTokenizer

    name = cfg.data.get("tokenizer")
    if not name:
        return {}
    src = Path(str(name)).expanduser().resolve()
    entries = {"text_tokenizer_source": {"path": str(src), "relative": os.path.relpath(src, out.resolve())}}
    if src.exists():
        tmp = out / f"text_tokenizer.json.{os.getpid()}.tmp"
        tmp.write_text(TextTokenizer.from_file(src, key="data.tokenizer").to_str(), encoding="utf-8")
        tmp.replace(out / "text_tokenizer.json")
        entries["text_tokenizer"] = "text_tokenizer.json"
    return entries


def build_datamodule(cfg: DictConfig, wanted: tuple[str, ...]):
    """The configured ImageTextDataModule indexing only ``wanted`` splits (plus train when val is carved
    out of it, so both keep the split training used); never streaming."""
    data = cfg.data
    carve = data.get("val") is None and float(data.get("val_fraction") or 0) > 0
    keep = set(wanted) | ({"train"} if carve and ("val" in wanted or "train" in wanted) else set())
    drop = {s: None for s in SPLITS if s not in keep}
    # Shapes keeps its tokenizer path so prepare_data builds tokenizer.json too: stage 2 reads it from
    # the manifest's data config
    tokenizer = data.get("tokenizer") if data.get("shapes") else None
    dm = instantiate(data, tokenizer=tokenizer, streaming=False, _convert_="all", **drop)
    for attr in ("prepare_data", "setup", "datasets"):
        if not hasattr(dm, attr):
            raise ConfigError(f"data._target_={data.get('_target_')}: t2i-tokenize needs an ImageTextDataModule")
    return dm


# -- the command ----------------------------------------------------------------------------------


def init_distributed(world: int) -> bool:
    """Under torchrun (MASTER_ADDR set) join a gloo group for barriers; file-based merging works without."""
    import torch.distributed as dist

    if world < 2 or "MASTER_ADDR" not in os.environ or not dist.is_available():
        return False
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(hours=24))
    return True


def barrier(distributed: bool) -> None:
    if distributed:
        import torch.distributed as dist

        dist.barrier()


def run(cfg: DictConfig) -> dict:
    """Tokenize the configured splits; returns a summary (per split counts, throughput, the manifest)."""
    rank, world = rank_world()
    checks.check_keys(cfg, KEYS)
    device = pick_device(cfg.device)  # a bad device fails before anything is written
    if cfg.split not in (*SPLITS, "all"):
        raise ConfigError(f"split={cfg.split}: use train, val, test or all")
    if not cfg.output:
        raise ConfigError("t2i-tokenize: `output=...` (the folder for the code shards) is required")
    if int(cfg.shard_size) < 1 or int(cfg.batch_size) < 1:
        raise ConfigError(f"shard_size={cfg.shard_size} batch_size={cfg.batch_size}: both must be >= 1")
    out = Path(str(cfg.output)).expanduser()
    tokenizer, ckpt, spec = load_image_tokenizer(cfg, out)
    f, k, size = int(tokenizer.downsample), int(tokenizer.codebook_size), int(cfg.data.image_size)
    if size % f:
        lower, upper = size - size % f, size - size % f + f
        raise DataError(f"data.image_size={size} is not divisible by the tokenizer's downsampling factor {f} "
                        f"(use e.g. data.image_size={upper}" + (f" or {lower})" if lower else ")"))
    grid = [size // f, size // f]
    header = {
        "version": VERSION, "tokenizer_ckpt": str(ckpt), "tokenizer_sha256": spec["sha256"]["ckpt"],
        "tokenizer_kind": cfg.tokenizer_kind, "image_tokenizer": spec, "grid": grid, "codebook_size": k, "downsample": f,
        "image_size": size, "dtype": code_dtype(k), "data": OmegaConf.to_container(cfg.data, resolve=True),
    }
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output={cfg.output} is a file; give a folder for the code shards")
    distributed = init_distributed(world)
    if cfg.overwrite:
        clear_output(out, rank, world)
    elif out.exists():
        check_output(out, header)
    out.mkdir(parents=True, exist_ok=True)

    wanted = SPLITS if cfg.split == "all" else (cfg.split,)
    dm = build_datamodule(cfg, wanted)
    if rank == 0:
        dm.prepare_data()
    barrier(distributed)
    if rank != 0:
        dm.prepare_data()
    dm.setup(None)
    header.update(embed_text_tokenizer(cfg, out))  # after prepare_data: Shapes builds its tokenizer there
    splits = [s for s in wanted if s in dm.datasets]
    if cfg.split != "all" and not splits:
        raise DataError(f"data.{cfg.split} is not set: give the {cfg.split} split's path with `data.{cfg.split}=...`")
    if not splits:
        raise DataError("no split configured: set data.train / data.val / data.test")
    for s in splits:
        if not hasattr(dm.datasets[s], "records"):
            raise DataError(f"data.{s}: t2i-tokenize needs an indexed split (got {type(dm.datasets[s]).__name__})")

    encoder = Encoder(tokenizer, device, grid, k, header["dtype"])
    state = RankState(out, rank, header)
    state.save()
    results, t0 = {}, time.perf_counter()
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]} img/s"), TextColumn("{task.fields[bad]} bad"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, disable=not cfg.progress) as bar:
        for s in splits:
            results[s] = encode_split(s, dm.datasets[s], encoder, state, out, rank, world, bar,
                                      float(cfg.data.get("max_bad_fraction", 0.01)), int(cfg.shard_size),
                                      int(cfg.data.image_size), int(cfg.batch_size), int(cfg.num_workers),
                                      bool(cfg.resume))
    seconds = time.perf_counter() - t0
    barrier(distributed)
    manifest = merge_manifests(out) if rank == 0 or not distributed else None

    who = f"[rank {rank}/{world}] " if world > 1 else ""
    for s, r in results.items():
        if r["log"].n_bad:
            print(who + r["log"].summary())
        print(f"{who}{s}: {r['count']} images in {r['shards']} shard(s) ({r['resumed']} finished earlier, "
              f"{r['encoded']} images read now)")
    n = encoder.images
    if n:
        print(f"{who}tokenized {n} images in {seconds:.1f} s: {n / seconds:.1f} images/s (encoder alone "
              f"{n / max(encoder.seconds, 1e-9):.1f} images/s) on {device}, grid {grid[0]}x{grid[1]}, "
              f"{k} codes; shards in {out}")
    else:
        print(f"{who}nothing to encode: every shard in {out} was finished earlier")
    if manifest is not None:
        print(f"manifest: {out / MANIFEST} (" + ", ".join(f"{s} {c}" for s, c in manifest["count"].items()) + ")")
    elif rank == 0 or not distributed:
        ranks = ", ".join(str(r) for r in rank_files(out))
        print(f"{MANIFEST} not written yet: it is merged once every rank has finished (rank files: {ranks})")
    if distributed:
        import torch.distributed as dist

        dist.destroy_process_group()
    for r in results.values():
        if r["error"] is not None:
            raise r["error"]
    return {"splits": results, "seconds": seconds, "images_per_s": n / seconds if n else 0.0,
            "encoder_images_per_s": n / encoder.seconds if encoder.seconds else 0.0,
            "manifest": manifest, "output": str(out), "device": str(device)}


@hydra.main(version_base="1.3", config_path="../conf", config_name="tokenize")
@clear_errors
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
