"""Checkpoint files: atomic writes, `resume=auto`, and one clear error for a corrupt or mismatched file.

A Lightning ``.ckpt`` is a zip (``torch.save``); a writer killed half way leaves a file without its
central directory, which ``torch.load`` then reports deep inside torch. ``AtomicCheckpointIO`` writes
next to the target and renames over it (``os.replace`` is atomic on POSIX), so ``last.ckpt`` is always
either the previous checkpoint or the new one.
"""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from t2i.errors import T2IError, reason

log = logging.getLogger("t2i.checkpoints")


class CheckpointError(T2IError):
    """A checkpoint that is missing, unreadable or does not fit the model being trained."""


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()


def check_readable(path: str | Path, what: str = "checkpoint") -> Path:
    """The path, or a :class:`CheckpointError` naming it when it is missing or not a complete file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{what} {path} is corrupt or truncated (not a complete torch.save file); "
                              "delete it and resume from an earlier one")
    return path


def check_fits(path: str | Path, model: torch.nn.Module, what: str = "checkpoint") -> None:
    """Compare the checkpoint's ``state_dict`` with ``model``'s: one error listing what does not fit."""
    path = check_readable(path, what)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise CheckpointError(f"{what} {path} cannot be read ({reason(exc)})") from exc
    state = ckpt.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(f"{what} {path} has no state_dict: not a Lightning checkpoint")
    have = model.state_dict()
    missing = sorted(set(have) - set(state))
    unexpected = sorted(set(state) - set(have))
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(have[k].shape)}" for k in have
              if k in state and tuple(state[k].shape) != tuple(have[k].shape)]
    if missing or unexpected or shapes:
        made = (ckpt.get("t2i_config") or {}).get("model", {}).get("_target_", "unknown")
        parts = [f"{what} {path} does not fit this model (it was made by {made})"]
        for name, items in (("shape mismatch", shapes), ("missing", missing), ("unexpected", unexpected)):
            if items:
                parts.append(f"{name} ({len(items)}): {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}")
        raise CheckpointError("; ".join(parts))


def resolve_resume(resume: str | None, ckpt_path: str | None, run_dir: Path) -> str | None:
    """The checkpoint a fit starts from: ``resume=auto`` takes ``<run>/checkpoints/last.ckpt`` when it
    exists (a fresh start otherwise); ``resume=<path>`` or ``ckpt_path=<path>`` names one."""
    if resume and ckpt_path:
        raise CheckpointError("set either resume or ckpt_path, not both")
    if not resume:
        return ckpt_path
    if str(resume) != "auto":
        return str(check_readable(resume, "resume"))
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.exists():
        check_readable(last, "resume=auto:")
        log.info("resume=auto: continuing from %s", last)
        return str(last)
    log.info("resume=auto: no %s yet, starting fresh", last)
    return None
