"""Peak memory of loading a split of code shards into memory: ``load_codes`` now vs the old way.

The old way (until this benchmark was added) iterated ``CodeShards`` - one int64 tensor per image -
stacked the list into one int64 tensor, and the code datamodule then cast it to int16. The new
``load_codes(..., dtype=None)`` copies each stored int16 grid into one preallocated int16 array.

Each variant runs in a fresh process; the number is that process's peak resident memory above its
resident memory just before loading (``ru_maxrss``, which counts torch's and numpy's allocations
alike), next to the size of the final int16 array.

    python experiments/code_loading/bench.py --records 20000 --grid 16 --out experiments/code_loading/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def write_codes(folder: Path, n: int, grid: int, codebook: int = 1024, shard_size: int = 5000) -> None:
    """``n`` random int16 grids in code shards plus a manifest, the layout ``t2i-tokenize`` writes."""
    from t2i.data.codes import CodeShardWriter, shard_name, write_json

    rng = np.random.default_rng(0)
    names = []
    for index, start in enumerate(range(0, n, shard_size)):
        w = CodeShardWriter(folder / shard_name("train", 0, index), "int16")
        for i in range(start, min(start + shard_size, n)):
            w.write(f"img{i:07d}", rng.integers(0, codebook, (grid, grid)), [f"caption {i}"])
        names.append(w.close().name)
    write_json(folder / "manifest.json", {
        "version": 1, "count": {"train": n}, "shards": {"train": names}, "grid": [grid, grid],
        "codebook_size": codebook, "downsample": 16, "image_size": 16 * grid, "dtype": "int16"})


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no /proc/self/status")


def measure(folder: str, variant: str) -> dict:
    """Run in a child: load the split one way, report the peak RSS above the pre-load RSS."""
    import torch

    from t2i.data.codes import CodeShards, load_codes

    before = rss_kib()
    if variant == "old":  # what load_codes + CodeDataModule.setup did before
        keys, grids, captions = [], [], []
        for key, codes, caps in CodeShards(folder, "train"):
            keys.append(key)
            grids.append(codes)
            captions.append(caps)
        codes = torch.stack(grids)
        del grids
        codes = codes.to(torch.int16)
    elif variant == "keys_only":  # the keys and captions every variant keeps, without the codes
        keys, captions = [], []
        for key, _, caps in CodeShards(folder, "train").arrays():
            keys.append(key)
            captions.append(caps)
        codes = torch.zeros(1, dtype=torch.int16)
    elif variant == "new":
        _, codes, _ = load_codes(folder, "train", dtype=None)
    elif variant == "new_long":
        _, codes, _ = load_codes(folder, "train")
    else:
        raise ValueError(variant)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"variant": variant, "peak_above_start_mib": (peak - before) / 1024, "dtype": str(codes.dtype),
            "checksum": int(codes.long().sum())}


def traced(n: int, grid: int) -> dict:
    """tracemalloc peaks (MiB) of the new path, with a manifest and from loose tars, and of keys alone."""
    import tracemalloc

    from t2i.data.codes import CodeShards, load_codes

    out = {"array": n * grid * grid * 2 / 2**20}
    with tempfile.TemporaryDirectory() as tmp:
        write_codes(Path(tmp), n, grid)
        def keys_only():
            keys, captions = [], []
            for key, _, caps in CodeShards(tmp, "train").arrays():
                keys.append(key)
                captions.append(caps)
            return keys, captions

        runs = {"keys": keys_only,
                "new": lambda: load_codes(tmp, "train", dtype=None),
                "glob": lambda: load_codes(f"{tmp}/*.tar", dtype=None)}
        for name, fn in runs.items():
            tracemalloc.start()
            result = fn()
            out[name] = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
            del result
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=20000)
    ap.add_argument("--grid", type=int, default=16)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        write_codes(Path(tmp), args.records, args.grid)
        results = []
        for variant in ("old", "new", "new_long", "keys_only"):
            res = subprocess.run([sys.executable, __file__, "--child", tmp, variant], capture_output=True, text=True,
                                 check=True)
            results.append(json.loads(res.stdout.strip().splitlines()[-1]))
    assert len({r["checksum"] for r in results[:3]}) == 1, "the variants loaded different codes"
    array_mib = args.records * args.grid * args.grid * 2 / 2**20
    old = results[0]["peak_above_start_mib"]
    labels = {"old": "old: int64 tensor per image, stack, cast to int16",
              "new": "new: `load_codes(dtype=None)` (what the code datamodule uses)",
              "new_long": "new: `load_codes()` returning int64 (the default)",
              "keys_only": "reference: keys and captions only, no codes"}
    lines = [
        "# Loading code shards into memory: peak resident memory",
        "",
        f"{args.records} images, {args.grid}x{args.grid} codes, int16 shards of 5000; the final int16 array is "
        f"{array_mib:.1f} MiB. Peak RSS above the RSS just before loading, one fresh process per row. "
        f"Machine: {platform.machine()}, Python {platform.python_version()}.",
        "",
        "| variant | result dtype | peak RSS above start (MiB) | vs old |",
        "|---|---|---:|---:|",
    ]
    for r in results:
        mib = r["peak_above_start_mib"]
        lines.append(f"| {labels[r['variant']]} | {r['dtype']} | {mib:.1f} | {mib / old:.2f}x |")
    tm = traced(args.records, args.grid)
    lines += [
        "",
        "RSS moves in allocator-sized steps, so small differences between rows are noise. Exact, with "
        "`tracemalloc` (it traces numpy's and Python's allocations but not torch's, so it can measure only "
        f"the new path): `load_codes(dtype=None)` peaks at {tm['new']:.2f} MiB, iterating the same shards keeping "
        f"only keys and captions at {tm['keys']:.2f} MiB: the codes cost {tm['new'] - tm['keys']:.2f} MiB for a "
        f"{tm['array']:.2f} MiB int16 array ({args.records} images). Read from loose tars (no manifest count, the "
        f"array grows by doubling) the peak is {tm['glob']:.2f} MiB.",
    ]
    lines += ["", f"Command: `python experiments/code_loading/bench.py --records {args.records} --grid {args.grid} "
                  "--out experiments/code_loading/RESULTS.md`", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
