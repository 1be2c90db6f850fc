"""Lightning strategies on torch.distributed, as the trainer configs build them (``conf/trainer/``).

``fsdp(...)`` is Lightning's ``FSDPStrategy`` with the wrapped classes named by dotted path in the
config (``t2i.models.transformer.Block``), and able to run on CPU with gloo (torch's FSDP needs an
explicit CPU ``device_id`` there, which Lightning does not pass): tests and laptops exercise the
same sharding code a GPU cluster runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.strategies import FSDPStrategy
from pytorch_lightning.strategies.fsdp import _setup_activation_checkpointing

from t2i.errors import ConfigError


def _classes(names: list[str] | None, key: str) -> set[type] | None:
    if not names:
        return None
    from hydra.utils import get_class

    out = set()
    for name in names:
        try:
            out.add(get_class(name))
        except Exception as exc:  # noqa: BLE001 - hydra raises several kinds for a bad path
            raise ConfigError(f"trainer.strategy.{key}: cannot import {name!r} ({exc})") from exc
    return out


class CPUFriendlyFSDP(FSDPStrategy):
    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if self.root_device.type != "cpu" or any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            return super()._setup_model(model)
        model = FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload,
                                         mixed_precision=self.mixed_precision_config,
                                         sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"),
                                         **self.kwargs)
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model


def fsdp(wrap: list[str] | None = None, activation_checkpointing: list[str] | None = None,
         sharding_strategy: str = "FULL_SHARD", state_dict_type: str = "full", cpu_offload: bool = False,
         **kwargs) -> FSDPStrategy:
    """FSDP that shards each ``wrap`` module (transformer blocks) and recomputes the activations of each
    ``activation_checkpointing`` module in the backward pass. ``state_dict_type=full`` gathers one
    ordinary checkpoint on rank 0 that loads without FSDP; ``sharded`` writes a folder per checkpoint."""
    wrap_cls = _classes(wrap, "wrap")
    ckpt_cls = _classes(activation_checkpointing, "activation_checkpointing")
    return CPUFriendlyFSDP(auto_wrap_policy=wrap_cls, activation_checkpointing_policy=ckpt_cls,
                           sharding_strategy=sharding_strategy, state_dict_type=state_dict_type,
                           cpu_offload=cpu_offload, **kwargs)


class SameRunDir(pl.Callback):
    """Every rank must write into one run folder. Hydra names it on each process separately; when the
    name falls back to the local time, ranks started a second apart would disagree."""

    def setup(self, trainer, pl_module, stage):
        if not (dist.is_available() and dist.is_initialized()) or trainer.world_size == 1:
            return
        mine = str(Path(trainer.default_root_dir).resolve())
        dirs: list = [None] * dist.get_world_size()
        dist.all_gather_object(dirs, mine)
        if len(set(dirs)) > 1:
            raise ConfigError(f"the ranks write to different run folders ({', '.join(sorted(set(dirs)))}): "
                              "give every process the same run_name=... or $T2I_RUN_ID "
                              "(experiments/launch/torchrun.sh sets it)")


def batch_share(n: int, device) -> torch.Tensor:
    """``n * world / N``: this rank's share of the global batch (``N`` summed over ranks), the factor that
    makes DDP's average of per-rank mean losses the mean over the global batch when ranks hold different
    numbers of samples (1 when they are equal, 0 on a rank with no sample, NaN when no rank has one).
    A device all-reduce, no host sync; collective: every rank calls it every step."""
    total = torch.tensor(float(n), device=device)
    world = 1
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
        world = dist.get_world_size()
    return n * world / total


def check_launch(num_nodes: int) -> None:
    """Several nodes need processes made by torchrun or srun; Lightning would otherwise start one node's
    worth of processes and wait forever for the rest."""
    if num_nodes > 1 and not any(v in os.environ for v in ("LOCAL_RANK", "SLURM_PROCID", "TORCHELASTIC_RUN_ID")):
        raise ConfigError(f"trainer.num_nodes={num_nodes}: launch every node's processes with torchrun or srun "
                          "(experiments/launch/torchrun.sh, experiments/launch/slurm.sbatch or hydra/launcher=slurm)")


def unsharded(trainer, pl_module, everywhere: bool = False):
    """``pl_module`` itself, or under FSDP a plain copy with the full weights for work outside the training
    forward (sampling for image grids and metrics): a sharded module cannot run a forward pass on one rank.
    Collective: call it on every rank. The copy exists on rank 0 (``None`` elsewhere) or, with
    ``everywhere``, on every rank."""
    from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType

    root = getattr(trainer.strategy, "model", None)
    if not isinstance(root, FullyShardedDataParallel):
        return pl_module
    config = FullStateDictConfig(offload_to_cpu=True, rank0_only=not everywhere)
    with FullyShardedDataParallel.state_dict_type(root, StateDictType.FULL_STATE_DICT, config):
        state = root.state_dict()
    if not (everywhere or trainer.is_global_zero):
        return None
    with torch.random.fork_rng(devices=[]):  # building the copy must not move the training RNG
        plain = type(pl_module)(**pl_module.hparams)
    plain.load_state_dict(state)
    getattr(pl_module, "image_tokenizer", None)  # built once on the module (frozen, not sharded), shared below
    for name in ("_image_tokenizer", "_image_tokenizer_record"):
        if hasattr(pl_module, name):
            setattr(plain, name, getattr(pl_module, name))
    return plain.to(pl_module.device).eval()
