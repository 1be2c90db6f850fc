"""load_codes: a split goes into one array of the stored type (int16/int32) with no int64 intermediates."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

from t2i.data.codes import CodeShards, CodeShardWriter, load_codes, shard_name, write_json
from t2i.data.skips import DataError


def write_codes(folder, grids, dtype="int16", shard_size=300, manifest=True):
    names = []
    for index, start in enumerate(range(0, len(grids), shard_size)):
        w = CodeShardWriter(folder / shard_name("train", 0, index), dtype)
        for i in range(start, min(start + shard_size, len(grids))):
            w.write(f"k{i}", grids[i], [f"caption {i}"])
        names.append(w.close().name)
    if manifest:
        h, w_ = grids.shape[1:]
        write_json(folder / "manifest.json", {
            "version": 1, "count": {"train": len(grids)}, "shards": {"train": names}, "grid": [h, w_],
            "codebook_size": int(grids.max()) + 1, "downsample": 4, "image_size": 4 * h, "dtype": dtype})


def test_stored_dtype_values_and_order(tmp_path):
    grids = np.random.default_rng(0).integers(0, 1024, (1000, 16, 16))
    write_codes(tmp_path, grids)
    keys, codes, caps = load_codes(tmp_path, "train", dtype=None)
    assert codes.dtype == torch.int16 and codes.shape == (1000, 16, 16)
    assert np.array_equal(codes.numpy(), grids) and keys == [f"k{i}" for i in range(1000)]
    assert caps[7] == ["caption 7"]
    _, long, _ = load_codes(tmp_path, "train")  # the default stays int64
    assert long.dtype == torch.long and torch.equal(long, codes.long())
    # loose tars (no manifest count: the array grows) give the same
    keys2, codes2, _ = load_codes(str(tmp_path / "*.tar"), dtype=None)
    assert keys2 == keys and torch.equal(codes2, codes) and codes2.dtype == torch.int16
    # iterating stays int64 per sample
    _, first, _ = next(iter(CodeShards(tmp_path, "train")))
    assert first.dtype == torch.long and torch.equal(first, long[0])


def test_int32_codes_stay_int32(tmp_path):
    grids = np.random.default_rng(1).integers(0, 40000, (50, 4, 4))
    write_codes(tmp_path, grids, dtype="int32")
    _, codes, _ = load_codes(tmp_path, "train", dtype=None)
    assert codes.dtype == torch.int32 and int(codes.max()) > 32767 and np.array_equal(codes.numpy(), grids)


def test_peak_memory_is_the_array_not_int64_copies(tmp_path):
    """tracemalloc sees numpy and Python allocations: loading costs about the int16 array on top of the
    keys and captions (an int64 array per sample or an int64 stack would cost 4x more)."""
    n = 2000
    write_codes(tmp_path, np.random.default_rng(2).integers(0, 1024, (n, 16, 16)), shard_size=1000)
    array = n * 16 * 16 * 2

    def keys_only():
        keys, captions = [], []
        for key, _, caps in CodeShards(tmp_path, "train").arrays():
            keys.append(key)
            captions.append(caps)
        return keys, captions

    peaks = {}
    for name, fn in (("keys", keys_only), ("codes", lambda: load_codes(tmp_path, "train", dtype=None))):
        tracemalloc.start()
        result = fn()
        peaks[name] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        del result
    extra = peaks["codes"] - peaks["keys"]
    assert 0.8 * array < extra < 1.25 * array, (extra, array)


def test_no_samples_is_a_clear_error(tmp_path):
    CodeShardWriter(tmp_path / shard_name("train", 0, 0), "int16").close()  # a shard with no sample
    with pytest.raises(DataError, match=r"code shards .*\*\.tar \(None\): no samples"):
        load_codes(str(tmp_path / "*.tar"), dtype=None)
