"""The training sampler: the same global batches at any world size, and resumable mid-epoch.

Epoch ``e`` shuffles with ``seed + e`` (not the global RNG), so a resumed run sees the order an
uninterrupted one would. The order is cut into global batches of ``batch_size * world`` samples and
rank ``r`` takes the ``r``-th slice of each: one process with batch 64 and two with batch 32 train on
the same 64 samples per step, and each sample's random caption is drawn from ``(seed, epoch, index)``
rather than a per-process generator. ``skip`` drops the batches a resumed epoch already trained on.

It subclasses :class:`DistributedSampler` only so Lightning leaves it in place
(``use_distributed_sampler`` re-wraps any other sampler).
"""

from __future__ import annotations

import random

import torch
from torch.utils.data import DistributedSampler

from t2i.data.skips import DataError


class BatchBlockSampler(DistributedSampler):
    def __init__(self, dataset, batch_size: int, rank: int = 0, world: int = 1, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = True, generator: torch.Generator | None = None):
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.batch_size = batch_size
        self.skip_batches = 0
        self.loader_generator = generator  # reseeded per epoch: the DataLoader's worker seeds
        block = batch_size * world
        n = len(dataset)
        if drop_last and n < block:
            raise DataError(f"the training split has {n} samples, fewer than one global batch "
                            f"(batch_size {batch_size} x {world} process(es)); lower data.batch_size")
        self.n_global = (n // block) * block if drop_last else n
        full, rest = divmod(self.n_global, block)
        self.num_samples = full * batch_size + min(batch_size, max(0, rest - rank * batch_size))
        self.total_size = self.n_global

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if self.loader_generator is not None:
            self.loader_generator.manual_seed(self.seed + epoch)

    def order(self) -> list[int]:
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            return torch.randperm(n, generator=g)[: self.n_global].tolist()
        return list(range(self.n_global))

    def __iter__(self):
        perm, block, b = self.order(), self.batch_size * self.num_replicas, self.batch_size
        mine = [i for start in range(0, len(perm), block) for i in perm[start + self.rank * b: start + (self.rank + 1) * b]]
        skip, self.skip_batches = self.skip_batches * b, 0  # only the epoch being resumed starts late
        # each index travels with its own draw seed: random choices made for a sample (which caption)
        # depend on (seed, epoch, sample), not on which rank or worker loads it
        return iter((i, (self.seed * 1_000_003 + self.epoch) * 1_000_033 + i) for i in mine[skip:])

    def __len__(self) -> int:
        return self.num_samples


def sample_rng(item) -> tuple[int, random.Random | None]:
    """A dataset's ``__getitem__`` argument: ``(index, draw seed)`` from :class:`BatchBlockSampler`, or a
    plain index (evaluation loaders). Returns the index and a generator for that sample's random choices."""
    if isinstance(item, tuple):
        return item[0], random.Random(item[1])
    return item, None


def train_sampler(datamodule, dataset, batch_size: int, seed: int,
                  drop_last: bool | None = None) -> tuple[BatchBlockSampler, torch.Generator]:
    """The sampler (and the DataLoader generator it reseeds) for a datamodule's training split; on a
    resumed fit it starts after the batches the checkpoint's epoch already consumed. ``drop_last``
    (default: only with several processes, where ranks must see equally many batches) drops the last
    partial global batch."""
    trainer = getattr(datamodule, "trainer", None)
    rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
    g = torch.Generator().manual_seed(seed)
    drop_last = world > 1 if drop_last is None else drop_last
    sampler = BatchBlockSampler(dataset, batch_size, rank, world, shuffle=True, seed=seed, drop_last=drop_last,
                                generator=g)
    if trainer is not None:
        sampler.skip_batches = resumed_batches(trainer)
    return sampler, g


def resumed_batches(trainer) -> int:
    """Batches of the current epoch already trained before the checkpoint being resumed (0 otherwise)."""
    try:
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
    except AttributeError:
        return 0
    return int(progress.ready) if trainer.ckpt_path else 0
