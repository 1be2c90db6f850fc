"""t2i-train: compose data + model + trainer + logger + callbacks with Hydra, fit, test the best checkpoint.

    t2i-train experiment=shapes_vqgan
    t2i-train -m experiment=shapes_transformer model.model.attention=full,dalle
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.utilities import rank_zero_only

from t2i.callbacks.config_saver import ConfigSaver
from t2i.callbacks.resume import DataPosition, Preempted, Preemption, RNGState
from t2i.callbacks.threads import follow_threads
from t2i.checkpoints import AtomicCheckpointIO, check_fits, resolve_resume
from t2i.cli.common import clear_errors, instantiate_group, save_config
from t2i.distributed import SameRunDir, check_launch
from t2i.errors import ConfigError

log = logging.getLogger("t2i.train")


def output_dir(cfg: DictConfig) -> Path:
    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path(cfg.paths.output_dir)


def train(cfg: DictConfig) -> tuple[dict, dict]:
    """Run one training job; returns (metrics, objects) so tests and sweeps can inspect both."""
    if cfg.get("model") is None:
        raise ConfigError("no model selected: pass `experiment=<name>` (see conf/experiment/) or `model=<name>`")
    check_launch(int(cfg.trainer.get("num_nodes") or 1))
    start = time.time()
    pl.seed_everything(cfg.seed, workers=True)
    # Subnormal floats make CPU kernels several times slower (seen: 3-14x on fresh conv weights);
    # flushing them to zero changes results by < 1e-38.
    torch.set_flush_denormal(True)
    out = output_dir(cfg)
    ckpt_path = resolve_resume(cfg.get("resume"), cfg.get("ckpt_path"), out)
    init = None
    if cfg.get("init_from"):  # another run's / an imported model's weights (and, for a transformer, its tokenizers)
        from t2i.cli import init_from

        init = init_from.read(cfg.init_from)
        if init_from.is_transformer(cfg):
            init_from.adopt(cfg, *init, out)
            init_from.check_codes(cfg, init[1]["hyper_parameters"]["model"], init[0])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if rank_zero_only.rank == 0:  # under DDP every rank runs this; one writes
        save_config(cfg, out)
        (out / "PREEMPTED").unlink(missing_ok=True)

    log.info("data: %s", cfg.data._target_)
    datamodule: pl.LightningDataModule = instantiate(cfg.data, _convert_="all")
    log.info("model: %s", cfg.model._target_)
    model: pl.LightningModule = instantiate(cfg.model, _convert_="all")
    if init is not None and not ckpt_path:  # a resumed run has its own, trained weights
        init_from.load_weights(model, *init)
    if ckpt_path and model.state_dict():  # a model built in configure_model has no weights to compare yet
        check_fits(ckpt_path, model, "resume" if cfg.get("resume") else "ckpt_path")
    callbacks = instantiate_group(cfg.get("callbacks")) + [ConfigSaver(resolved), RNGState(), DataPosition(), Preemption(),
                                                           SameRunDir(), *follow_threads()]
    loggers = build_loggers(cfg.get("logger"), out, resumed=bool(ckpt_path))
    trainer_cfg = cfg.trainer
    if trainer_cfg.get("sync_batchnorm") and not uses_gpu(trainer_cfg):
        log.warning("trainer.sync_batchnorm needs a GPU: off on CPU")
        trainer_cfg = OmegaConf.merge(trainer_cfg, {"sync_batchnorm": False})
    if trainer_cfg.get("strategy") == "ddp" and not model.automatic_optimization:
        # a GAN step runs two backward passes (generator, discriminator) per forward; DDP must then look
        # for parameters a pass did not reach, or it stops at the next step
        log.info("manual optimization under DDP: strategy=ddp_find_unused_parameters_true")
        trainer_cfg = OmegaConf.merge(trainer_cfg, {"strategy": "ddp_find_unused_parameters_true"})
    trainer: pl.Trainer = instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False,
                                      plugins=[AtomicCheckpointIO()])
    for lg in loggers:
        lg.log_hyperparams(resolved)

    status = "finished"
    if cfg.get("train"):
        try:
            trainer.fit(model=model, datamodule=datamodule, ckpt_path=ckpt_path)
        except Preempted as exc:
            log.warning("preempted by %s: %s; rerun with resume=auto to continue", exc.signame, exc)
            status = "preempted"
    train_metrics = dict(trainer.callback_metrics)
    tokenizer = getattr(datamodule, "tokenizer", None)
    if tokenizer is not None and trainer.is_global_zero:  # beside the checkpoints (it is inside them too)
        tokenizer.save(out / "tokenizer.json")

    has_test = getattr(datamodule, "has_split", lambda split: True)("test")
    if cfg.get("test") and not has_test:
        log.warning("test=true but the data has no test split (data.test): skipping the test")
    if cfg.get("test") and has_test and status == "finished":
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if not best:
            log.warning("no best checkpoint kept (no monitor?): testing the current weights")
        trainer.test(model=model, datamodule=datamodule, ckpt_path=best or None)
        log.info("tested checkpoint: %s", best or "<current weights>")
    metrics = {k: float(v) for k, v in {**train_metrics, **trainer.callback_metrics}.items()}
    if trainer.is_global_zero:
        write_summary(out, cfg, metrics, status, trainer, time.time() - start)
    return metrics, {"cfg": cfg, "datamodule": datamodule, "model": model, "trainer": trainer, "status": status}


def uses_gpu(trainer_cfg: DictConfig) -> bool:
    acc = str(trainer_cfg.get("accelerator") or "auto")
    return acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available())


def build_loggers(group: DictConfig | None, out: Path, resumed: bool = False) -> list:
    """The configured loggers. W&B: ``offline: null`` means offline unless an API key is configured
    (``$WANDB_API_KEY`` or ``wandb login``); checkpoints go up as artifacts only when online; a sweep's
    runs share one ``group`` (the sweep folder) unless one is set; a resumed run continues its W&B run
    (the id is kept in ``<run>/wandb/run_id``)."""
    if not group:
        return []
    group = group.copy()
    wandb_cfg = group.get("wandb")
    if wandb_cfg is not None and "_target_" in wandb_cfg:
        with open_dict(wandb_cfg):
            if wandb_cfg.get("offline") is None:
                wandb_cfg.offline = not wandb_online()
            if wandb_cfg.get("log_model") is None:
                wandb_cfg.log_model = not wandb_cfg.offline
            if not wandb_cfg.get("group") and HydraConfig.initialized() and \
                    HydraConfig.get().mode == RunMode.MULTIRUN:
                wandb_cfg.group = Path(HydraConfig.get().sweep.dir).name
            if wandb_cfg.get("id") is None:
                wandb_cfg.id = wandb_run_id(out / "wandb" / "run_id", resumed)
                wandb_cfg.resume = "allow"
    return instantiate_group(group)


def wandb_run_id(path: Path, resumed: bool) -> str:
    """The W&B run id of this run folder: kept on a resume, new otherwise (only rank 0's is used and saved)."""
    if resumed and path.is_file():
        return path.read_text().strip()
    run_id = f"{time.strftime('%Y%m%d%H%M%S')}-{os.urandom(4).hex()}"
    if rank_zero_only.rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id + "\n")
    return run_id


def wandb_online() -> bool:
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun"):
        return False
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def write_summary(out: Path, cfg: DictConfig, metrics: dict, status: str, trainer: pl.Trainer,
                  seconds: float) -> None:
    """``<run>/metrics.json``: final metrics, overrides, status and checkpoints (read by t2i-sweep-report)."""
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    ckpt = trainer.checkpoint_callback
    summary = {"status": status, "metrics": metrics, "overrides": overrides,
               "optimized_metric": cfg.get("optimized_metric"), "global_step": trainer.global_step,
               "epoch": trainer.current_epoch, "wall_seconds": round(seconds, 1),
               "best_checkpoint": ckpt.best_model_path if ckpt else None,
               "world_size": trainer.world_size, "num_nodes": trainer.num_nodes}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")


def metric_value(metrics: dict, name: str | None) -> float | None:
    """The value sweepers optimise. None, with a warning, when its phase never ran (``val/...`` from a run
    that stopped before its first validation, e.g. ``trainer.max_steps`` below an epoch); a clear error
    when the phase ran but did not log it (a misspelt name)."""
    if not name:
        return None
    phase = name.split("/", 1)[0] + "/" if "/" in name else None
    if name not in metrics and phase and not any(k.startswith(phase) for k in metrics):
        log.warning("optimized_metric=%s: the run logged no %s metrics (it ended before the first %s); "
                    "returning no value", name, phase, "validation" if phase == "val/" else phase.rstrip("/"))
        return None
    if name not in metrics:
        raise ConfigError(
            f"optimized_metric={name} was not logged; logged metrics: {', '.join(sorted(metrics)) or 'none'}"
        )
    return metrics[name]


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
@clear_errors
def main(cfg: DictConfig) -> float | None:
    metrics, obj = train(cfg)
    if obj["status"] != "finished":  # preempted: exit 0, the checkpoint is saved; resume=auto continues
        return None
    return metric_value(metrics, cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
