"""Fault tolerance: exact resumption and clean preemption.

``RNGState`` puts every rank's Python / NumPy / torch (CPU and CUDA) generator states into each
checkpoint and restores them just before the first training batch after a resume, so that dropout,
caption dropout and random captions continue as if the run had never stopped. (The data order is
restored by :mod:`t2i.data.sampler`.)

``Preemption`` turns SIGTERM and SIGUSR1 (SLURM's pre-timeout signal, ``--signal=USR1@120``) into:
finish the current batch, agree across ranks, write ``checkpoints/last.ckpt``, write a ``PREEMPTED``
marker in the run folder, and leave ``t2i-train`` with exit code 0 (``resume=auto`` continues).
"""

from __future__ import annotations

import logging
import random
import signal
import threading
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist

log = logging.getLogger("t2i.resume")


class Preempted(BaseException):
    """Raised through Lightning after the preemption checkpoint is written (BaseException: Lightning
    tears down and re-raises it; ``t2i-train`` catches it and exits 0)."""

    def __init__(self, signame: str, step: int, path: str):
        super().__init__(f"{signame}: checkpoint at step {step} written to {path}")
        self.signame, self.step, self.path = signame, step, path


def _rng_states() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
             "has_gauss": int(has_gauss), "gauss": float(gauss)}  # plain types: loadable with weights_only
    state = {"python": random.getstate(), "numpy": numpy, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_states(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RNGState(pl.Callback):
    def __init__(self):
        self._pending: dict | None = None

    def state_dict(self) -> dict:
        mine = _rng_states()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ranks: list = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, mine)
            return {"ranks": ranks}
        return {"ranks": [mine]}

    def load_state_dict(self, state: dict) -> None:
        ranks = state.get("ranks") or []
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if len(ranks) > rank:
            self._pending = ranks[rank]
        else:
            log.warning("the checkpoint holds random states for %d rank(s); rank %d keeps its own seed "
                        "(the resumed run is not bit-identical to an uninterrupted one)", len(ranks), rank)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._pending is not None:
            _set_rng_states(self._pending)
            self._pending = None


class Preemption(pl.Callback):
    def __init__(self, signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1"), marker: str = "PREEMPTED"):
        self.signals, self.marker = tuple(signals), marker
        self._received: str | None = None
        self._previous: dict = {}

    def _handler(self, signum, frame) -> None:
        self._received = signal.Signals(signum).name
        log.warning("received %s: saving a checkpoint after this batch", self._received)

    def on_train_start(self, trainer, pl_module):
        # Lightning registered its own SIGTERM handler before this hook; ours replaces it for the fit
        # (Lightning's kills the other ranks at once; ours lets every rank finish the batch and save).
        if threading.current_thread() is not threading.main_thread():
            return
        for name in self.signals:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._handler)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        stop = trainer.strategy.reduce_boolean_decision(self._received is not None, all=False)
        if not stop:
            return
        run = Path(trainer.default_root_dir)
        ckpt = trainer.checkpoint_callback
        path = Path(ckpt.dirpath) / f"{ckpt.CHECKPOINT_NAME_LAST}{ckpt.FILE_EXTENSION}" if ckpt and ckpt.dirpath \
            else run / "checkpoints" / "last.ckpt"
        trainer.save_checkpoint(path)
        signame = self._received or "a signal on another rank"
        if trainer.is_global_zero:
            (run / self.marker).write_text(f"{signame} at step {trainer.global_step}; checkpoint {path}\n")
        raise Preempted(signame, trainer.global_step, str(path))

    def teardown(self, trainer, pl_module, stage):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
