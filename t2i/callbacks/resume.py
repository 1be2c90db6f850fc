"""Fault tolerance: exact resumption and clean preemption.

``RNGState`` puts every rank's Python / NumPy / torch (CPU and CUDA) generator states into each
checkpoint and restores them just before the next training batch -- after a resume, and also in the
run that goes on, so whatever ran between the checkpoint and that batch (a new epoch's loader, ...)
draws the same in both. Validation (image logging, the metrics callback, tokenizers built lazily on
first use) runs on a copy of the states that is thrown away afterwards: it never shifts the training
stream. Together, dropout, caption dropout and random captions continue as if the run had never
stopped. (The data order is restored by :mod:`t2i.data.sampler`.)

``Preemption`` turns the signals launchers send before they kill a job -- SIGTERM (torchrun, SLURM's
``scancel`` and time limit, Kubernetes), SIGUSR1 (``sbatch --signal=USR1@120``, the launch scripts
here) and SIGUSR2 (submitit, i.e. ``hydra/launcher=slurm``) -- into: finish the current batch, agree
across ranks, write ``checkpoints/last.ckpt``, write a ``PREEMPTED`` marker in the run folder, and
leave ``t2i-train`` with exit code 0 (``resume=auto`` continues). A handler a launcher had installed
(submitit's, which requeues the job and exits) is called after the checkpoint is written. Under DDP the ranks agree every
``check_every`` batches (a collective with a host sync); one process checks every batch for free.
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
        self._before_validation: dict | None = None

    def state_dict(self) -> dict:
        # training continues from these states (inside validation: from those before it), in this run at
        # the next training batch, and the same in a run resumed from this checkpoint
        mine = self._before_validation or _rng_states()
        self._pending = mine
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

    def on_validation_start(self, trainer, pl_module):
        self._before_validation = _rng_states()

    def on_validation_end(self, trainer, pl_module):
        # runs before the checkpoint callbacks' on_validation_end (Lightning orders those last)
        if self._before_validation is not None:
            _set_rng_states(self._before_validation)
            self._before_validation = None


class DataPosition(pl.Callback):
    """On a resumed fit, the training sampler (:class:`t2i.data.sampler.BatchBlockSampler`) continues
    the checkpoint's epoch after the batches it had consumed. Lightning may build the loader, and its
    iterator (with workers: the first indices too), before it restores its loop counters -- to estimate
    the number of steps of an LR schedule when ``trainer.max_epochs`` is set -- and does not rebuild it
    for the resumed epoch; the epoch would start over, in epoch 0's order. So at ``on_train_start``
    (counters restored, no batch drawn yet) this sets the epoch and the batches to skip and rebuilds the
    iterator."""

    def on_train_start(self, trainer, pl_module):
        from t2i.data.sampler import BatchBlockSampler, resumed_batches

        sampler = getattr(trainer.train_dataloader, "sampler", None)
        if not trainer.ckpt_path or not isinstance(sampler, BatchBlockSampler):
            return
        done = resumed_batches(trainer)
        if not 0 < done < trainer.num_training_batches:  # saved at an epoch's end: the next starts afresh
            return
        sampler.set_epoch(trainer.fit_loop.epoch_progress.current.processed)  # what Lightning sets next
        sampler.skip_batches = done
        fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
        if fetcher is not None:
            iter(fetcher)  # a fresh iterator from the position just set (Lightning's setup does the same)


class Preemption(pl.Callback):
    def __init__(self, signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1", "SIGUSR2"), marker: str = "PREEMPTED",
                 check_every: int = 10):
        self.signals, self.marker, self.check_every = tuple(signals), marker, max(1, int(check_every))
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
        if trainer.world_size > 1 and (batch_idx + 1) % self.check_every:  # the same batches on every rank
            return
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
        self._hand_on()
        raise Preempted(signame, trainer.global_step, str(path))

    def _hand_on(self) -> None:
        """The checkpoint is written: pass the signal to the handler ours replaced when a launcher set it
        (submitit's USR2 handler requeues the job, then exits); Lightning's own handlers are skipped."""
        if self._received is None:
            return
        sig = getattr(signal, self._received)
        previous = self._previous.get(sig)
        if not callable(previous) or previous in (signal.SIG_DFL, signal.SIG_IGN):
            return
        owner = getattr(previous, "__self__", previous)
        module = getattr(owner, "__module__", None) or type(owner).__module__
        if module.startswith(("pytorch_lightning", "lightning")):
            return
        log.warning("%s: the checkpoint is written; handing the signal on to %s", self._received, module)
        previous(sig, None)

    def teardown(self, trainer, pl_module, stage):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
