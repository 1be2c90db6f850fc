"""A split's images encoded into code shards by an image tokenizer: one rank's share, resumable shard by
shard, with the output folder's checks (``t2i-tokenize`` is the command; the layout is :mod:`t2i.data.codes`).

* :func:`check_output` refuses a folder written with another tokenizer or other settings, :func:`clear_output`
  empties this rank's part of it (``overwrite=true``);
* :class:`RankState` is this rank's ``manifest.rank{r}.json``;
* :class:`Encoder` runs the tokenizer on uint8 batches and checks the codes it returns;
* :func:`encode_split` writes the shards, skipping (and counting) images that do not decode.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from rich.markup import escape
from torch import nn
from torch.utils.data import DataLoader, Dataset

from t2i.data.codes import (
    HEADER_KEYS,
    MANIFEST,
    SHARD_RE,
    CodeShardWriter,
    code_files,
    describe,
    rank_file,
    rank_files,
    read_json,
    shard_name,
    write_json,
)
from t2i.data.skips import BadSample, DataError, SkipLog
from t2i.data.transforms import ImageTransform, from_raw
from t2i.devices import threads_file
from t2i.errors import ConfigError


def clear_output(out: Path, rank: int, world: int) -> None:
    """overwrite=true: delete this rank's shards and state (rank 0: also the manifest and the files of
    ranks this run does not have)."""
    for p in code_files(out):
        r = int(SHARD_RE.fullmatch(p.name)["rank"])
        if r == rank or (rank == 0 and r >= world):
            p.unlink(missing_ok=True)
    for r, p in rank_files(out).items():
        if r == rank or (rank == 0 and r >= world):
            p.unlink(missing_ok=True)
    if rank == 0:
        (out / MANIFEST).unlink(missing_ok=True)


def check_output(out: Path, header: dict) -> None:
    """Refuse an output folder written with another tokenizer or other settings (overwrite=true replaces)."""
    others = [(p, read_json(p)) for p in rank_files(out).values()]
    if (out / MANIFEST).exists():
        others.append((out / MANIFEST, read_json(out / MANIFEST)))
    for path, other in others:
        if other.get("tokenizer_sha256") != header["tokenizer_sha256"]:
            raise DataError(
                f"output={out} holds code shards from another image tokenizer ({path.name}: {describe(other)}); "
                f"this run uses {header['tokenizer_ckpt']} (sha256 {header['tokenizer_sha256'][:12]}). Choose "
                f"another output, or pass overwrite=true to replace them"
            )
        diff = [k for k in HEADER_KEYS if other.get(k) != header[k]]
        if diff:
            was = ", ".join(f"{k}={other.get(k)}" for k in diff)
            now = ", ".join(f"{k}={header[k]}" for k in diff)
            raise DataError(f"output={out} holds code shards made with {was} ({path.name}); this run has {now}. "
                            f"Choose another output, or pass overwrite=true to replace them")
    if not others and code_files(out):
        raise DataError(f"output={out} holds codes-*.tar shards but no manifest or rank state; choose another "
                        f"output, or pass overwrite=true to replace them")


class RankState:
    """This rank's ``manifest.rank{r}.json``: the header plus, per split, the finished shards."""

    def __init__(self, out: Path, rank: int, header: dict):
        self.path = rank_file(out, rank)
        old = read_json(self.path) if self.path.exists() else {}
        self.data = {**header, "rank": rank, "splits": old.get("splits", {})}

    @property
    def splits(self) -> dict:
        return self.data["splits"]

    def save(self) -> None:
        write_json(self.path, self.data)


class ShardImages(Dataset):
    """Loads and transforms the images at ``positions`` of ``records``; a failed load is a ``bad`` marker."""

    def __init__(self, source, records, positions: list[int], transform):
        self.source, self.records, self.positions, self.transform = source, records, positions, transform

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> dict:
        pos = self.positions[i]
        try:
            return {"pos": pos, "image": self.transform(self.source.load(self.records[pos]))}
        except BadSample as e:
            return {"pos": pos, "bad": (e.reason, e.where)}


def collate(items: list[dict]) -> dict:
    good = [x["image"] for x in items if "bad" not in x]
    return {"pos": [x["pos"] for x in items], "bad": [x.get("bad") for x in items],
            "image": torch.stack(good) if good else None}


class Encoder:
    """Runs the tokenizer on uint8 batches and checks its output; keeps the time spent in it."""

    def __init__(self, tokenizer: nn.Module, device: torch.device, grid: list[int], codebook_size: int, dtype: str):
        self.tokenizer, self.device, self.grid = tokenizer.to(device), device, grid
        self.codebook_size, self.dtype = codebook_size, np.dtype(dtype)
        self.seconds, self.images = 0.0, 0

    @torch.inference_mode()
    def __call__(self, raw: torch.Tensor) -> np.ndarray:
        t0 = time.perf_counter()
        codes = self.tokenizer.encode(from_raw(raw.to(self.device, non_blocking=True))).cpu()
        self.seconds += time.perf_counter() - t0
        self.images += len(raw)
        if list(codes.shape[1:]) != self.grid:
            raise ConfigError(f"the image tokenizer returned codes of shape {list(codes.shape)} for "
                              f"{raw.shape[1]} px images; its downsample={self.tokenizer.downsample} promises "
                              f"[B, {self.grid[0]}, {self.grid[1]}]")
        if codes.dtype.is_floating_point or int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size:
            raise ConfigError(f"the image tokenizer returned codes outside [0, {self.codebook_size}) "
                              f"(min {codes.min().item()}, max {codes.max().item()}, dtype {codes.dtype})")
        return codes.numpy().astype(self.dtype)


def encode_split(split: str, ds, encoder: Encoder, state: RankState, out: Path, rank: int, world: int, bar,
                 max_bad_fraction: float, shard_size: int, image_size: int, batch_size: int, num_workers: int = 0,
                 resume: bool = True) -> dict:
    """Encode this rank's share (records ``rank::world``) of one split ``ds`` into its shards, skipping the
    finished ones (``resume``); ``bar``: a rich ``Progress`` with ``bad`` and ``rate`` fields."""
    records = ds.records[rank::world]
    size = int(shard_size)
    n_shards = math.ceil(len(records) / size)
    params = {"world_size": world, "shard_size": size, "records": len(ds.records)}
    for r, p in rank_files(out).items():  # every rank's entry of this split must agree with this run
        entry = (state.data if r == rank else read_json(p)).get("splits", {}).get(split)
        clash = [k for k, v in params.items() if entry and entry.get(k) != v]
        if clash:
            was = ", ".join(f"{k}={entry[k]}" for k in clash)
            now = ", ".join(f"{k}={params[k]}" for k in clash)
            raise DataError(f"output={out}: its {split} split was written with {was} ({p.name}); this run has {now} "
                            f"(records = the split's size: did the data change?). Rerun with the same settings "
                            f"(WORLD_SIZE, shard_size), or pass overwrite=true to start again")
    entry = state.splits.get(split)
    if entry is None or not resume:
        for p in code_files(out):
            m = SHARD_RE.fullmatch(p.name)
            if m["split"] == split and int(m["rank"]) == rank:
                p.unlink()
        entry = {**params, "complete": False, "shards": {}}
    entry["shards"] = {n: info for n, info in entry["shards"].items() if (out / n).exists()}
    entry["complete"] = False
    state.splits[split] = entry
    state.save()
    todo = [i for i in range(n_shards) if shard_name(split, rank, i) not in entry["shards"]]
    positions = [p for i in todo for p in range(i * size, min((i + 1) * size, len(records)))]

    workers = int(num_workers)
    loader = DataLoader(
        ShardImages(ds.source, records, positions, ImageTransform(int(image_size), False, raw=True)),
        batch_size=int(batch_size), shuffle=False, num_workers=workers, collate_fn=collate,
        pin_memory=encoder.device.type == "cuda", persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )
    task = bar.add_task(escape(f"{split} (rank {rank}/{world})"), total=len(positions), bad=0, rate="-")
    writer, slog, index, t0, done = None, None, -1, time.perf_counter(), 0

    def finish() -> None:
        path = writer.close()
        lo = index * size
        entry["shards"][path.name] = {"count": writer.count, "records": [lo, min(lo + size, len(records))],
                                      "skipped": slog.to_dict()}
        state.save()

    follow = threads_file()  # t2i-demo may hand this stage more cores while it runs
    try:
        for batch in loader:
            if follow is not None:
                follow.check()
            codes = encoder(batch["image"]) if batch["image"] is not None else None
            k = 0
            for pos, bad in zip(batch["pos"], batch["bad"]):
                if pos // size != index:
                    if writer is not None:
                        finish()
                    index = pos // size
                    writer = CodeShardWriter(out / shard_name(split, rank, index), encoder.dtype)
                    slog = SkipLog(max_bad_fraction, name=f"{split} images")
                if bad is not None:
                    slog.skip(*bad)
                    continue
                rec = records[pos]
                writer.write(rec.key, codes[k], rec.captions, rec.where, links=rec.links)
                slog.ok()
                k += 1
            done += len(batch["pos"])
            rate = done / max(time.perf_counter() - t0, 1e-9)
            n_bad = sum(b is not None for b in batch["bad"])
            bar.update(task, advance=len(batch["pos"]), bad=bar.tasks[task].fields["bad"] + n_bad,
                       rate=f"{rate:.0f}")
        if writer is not None:
            finish()
            writer = None
    finally:
        if writer is not None:  # an error or ^C mid-shard: no half-written .tmp left behind
            writer.abort()

    split_log = SkipLog(max_bad_fraction, name=f"{split} images (rank {rank})")
    for info in entry["shards"].values():
        split_log.merge(info["skipped"])
    problem = None
    try:
        split_log.check()
    except DataError as e:
        problem = e
    entry["complete"] = problem is None  # a split past max_bad_fraction never reaches the manifest
    state.save()
    return {
        "count": sum(info["count"] for info in entry["shards"].values()),
        "shards": n_shards,
        "resumed": n_shards - len(todo),
        "encoded": len(positions),
        "log": split_log,
        "error": problem,
    }
