"""t2i's Hydra configs. Importing this package registers the ``t2i_run_id`` resolver the run folders use."""

from __future__ import annotations

import os
import time

from omegaconf import OmegaConf


def run_id(name: str | None = None) -> str:
    """The run folder's name, the same on every rank of a distributed job: ``run_name`` when set, else
    ``$T2I_RUN_ID`` (the launch scripts set it), ``$SLURM_JOB_ID`` (a requeued job finds its folder
    again), torchrun's rendezvous id, else the local time (one process)."""
    if name:
        return str(name)
    for var in ("T2I_RUN_ID", "SLURM_ARRAY_JOB_ID", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        value = os.environ.get(var, "")
        if value and value != "none":
            if var == "SLURM_ARRAY_JOB_ID":
                value += "_" + os.environ.get("SLURM_ARRAY_TASK_ID", "0")
            return value
    return time.strftime("%Y-%m-%d_%H-%M-%S")


if not OmegaConf.has_resolver("t2i_run_id"):
    OmegaConf.register_new_resolver("t2i_run_id", run_id, use_cache=True)
