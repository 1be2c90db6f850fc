"""Streaming webdataset shards: split by DDP rank and loader worker, reproducible shuffling,
an exact number of samples per rank per epoch when asked, and bad samples passed on as markers.
"""

from __future__ import annotations

import random
import tarfile

import torch
from torch.utils.data import IterableDataset, get_worker_info

from t2i.data.skips import BadSample, DataError
from t2i.data.wds import decode_wds_sample, json_links


def worker_share(total: int, worker: int, workers: int) -> int:
    """How many of ``total`` samples worker ``worker`` of ``workers`` yields (exact, no rounding up)."""
    return total // workers + (1 if worker < total % workers else 0)


class StreamingPairs(IterableDataset):
    """Samples from webdataset shards, streamed.

    Shards are shuffled with a seed shared by every rank (so the split is a partition), dealt
    round-robin to ranks (``rank``/``world_size``, given by the data module from the trainer),
    then to loader workers. Samples are shuffled in a buffer seeded by (seed, epoch, rank, worker).
    With ``epoch_length`` each rank yields exactly that many pairs per epoch, cycling over its
    shards as often as needed, so all DDP ranks run the same number of steps. The epoch counter
    lives in the worker, so with persistent workers every epoch gets a new order.
    """

    def __init__(self, urls: list[str], transform, every_caption: bool, shuffle: int = 0,
                 epoch_length: int | None = None, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.urls, self.transform, self.every_caption = list(urls), transform, every_caption
        self.shuffle, self.epoch_length, self.seed = shuffle, epoch_length, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def _my_shards(self, epoch: int, worker: int, workers: int) -> list[str]:
        urls = list(self.urls)
        if self.shuffle:
            random.Random(f"{self.seed}-{epoch}").shuffle(urls)
        return urls[self.rank :: self.world_size][worker::workers]

    def _read(self, urls: list[str], rng: random.Random):
        """Raw webdataset samples of ``urls`` in order (shuffled in a buffer when training)."""
        import webdataset as wds

        ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
        if self.shuffle:
            ds = ds.shuffle(self.shuffle, rng=rng)
        it = iter(ds)
        while True:
            try:
                yield next(it)
            except StopIteration:
                return
            except (tarfile.TarError, OSError, EOFError) as e:
                shard = next((a for a in e.args[1:] if isinstance(a, str)), "a shard")
                raise DataError(
                    f"{shard} cannot be read ({e.args[0] if e.args else e}); rebuild it with `t2i-data convert` "
                    "or drop it from the data split's shard list"
                ) from None

    def _pairs(self, raw):
        for sample in raw:
            where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
            try:
                key, image, captions = decode_wds_sample(sample, where)
            except BadSample as e:
                yield {"bad": (e.reason, e.where)}
                continue
            image = self.transform(image)
            links = json_links(sample.get("json"), len(captions))
            chosen = range(len(captions)) if self.every_caption else [int(torch.randint(len(captions), ()))]
            for j in chosen:
                item = {"image": image, "caption": captions[j], "key": key}
                if links is not None:
                    item["links"] = links[j]
                yield item

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        epoch, self.epoch = self.epoch, self.epoch + 1
        if not self.epoch_length:
            shards = self._my_shards(epoch, worker, workers)
            rng = random.Random(f"{self.seed}-{epoch}-{self.rank}-{worker}")
            yield from self._pairs(self._read(shards, rng))
            return
        active = min(workers, len(self.urls[self.rank :: self.world_size]))  # workers that get shards
        if worker >= active:
            return
        quota, n, cycle = worker_share(self.epoch_length, worker, active), 0, 0
        while n < quota:  # cycle over this worker's shards until its share of the epoch is out
            shards = self._my_shards(epoch * 1000 + cycle, worker, active)
            rng = random.Random(f"{self.seed}-{epoch}-{cycle}-{self.rank}-{worker}")
            good = 0
            for item in self._pairs(self._read(shards, rng)):
                yield item
                if "bad" not in item:
                    n, good = n + 1, good + 1
                    if n >= quota:
                        return
            if good == 0:
                raise DataError(f"shards {shards} yielded no usable sample")
            cycle += 1
