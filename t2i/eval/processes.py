"""The processes of an evaluation and what makes its numbers reproducible: torchrun / srun ranks, gathering
objects on every rank, the autocast setting, file hashes and package versions."""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
import torch.distributed as dist

from t2i import devices
from t2i.data.specs import file_sha256
from t2i.errors import ConfigError


def slurm_to_torchrun_env() -> None:
    """Under ``srun`` (one task per GPU) name the ranks as torchrun does: RANK, WORLD_SIZE, LOCAL_RANK,
    and MASTER_ADDR / MASTER_PORT when the batch script did not export them (the job's first node)."""
    env = os.environ
    if "WORLD_SIZE" in env or int(env.get("SLURM_NTASKS", "1")) < 2 or "SLURM_PROCID" not in env:
        return
    env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env["SLURM_NTASKS"], LOCAL_RANK=env.get("SLURM_LOCALID", "0"))
    if "MASTER_ADDR" not in env:
        from lightning_fabric.plugins.environments import SLURMEnvironment

        env["MASTER_ADDR"] = SLURMEnvironment.resolve_root_node_address(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))


def start_processes(device: torch.device) -> bool:
    """Join the process group torchrun / srun describe (WORLD_SIZE > 1): nccl on a GPU, gloo on the CPU.
    True when this call made the group (and should end it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2 or (dist.is_available() and dist.is_initialized()):
        return False
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", "RANK") if k not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set: start t2i-eval "
                          "with torchrun (torchrun --nproc_per_node=N -m t2i.cli.evaluate ...) or srun")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]))
    return True


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gathered(obj) -> list:
    """``obj`` from every rank (rank order); ``[obj]`` in one process."""
    rank, world = rank_world()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def autocast_dtype(cfg, device: torch.device) -> torch.dtype | None:
    """The ``autocast`` setting of an eval config: auto (bf16 on CUDA, off elsewhere), bf16, fp16 or null."""
    return devices.autocast_dtype(cfg.get("autocast", "auto"), device)


def sha256(path) -> str | None:
    return file_sha256(path) if path and Path(str(path)).is_file() else None


def versions() -> dict:
    out = {}
    for pkg in ("t2i", "torch", "torchvision", "torchmetrics", "torch-fidelity", "numpy", "pillow", "open_clip_torch",
                "cn_clip"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out
