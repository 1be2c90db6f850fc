"""t2i-train: compose data + model + trainer + logger + callbacks with Hydra, fit, test the best checkpoint.

    t2i-train experiment=shapes_vqgan
    t2i-train -m experiment=shapes_transformer model.attention=full,dalle
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only

from t2i.callbacks.config_saver import ConfigSaver
from t2i.cli.common import clear_errors, instantiate_group, save_config
from t2i.errors import ConfigError

log = logging.getLogger("t2i.train")


def output_dir(cfg: DictConfig) -> Path:
    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path(cfg.paths.output_dir)


def train(cfg: DictConfig) -> tuple[dict, dict]:
    """Run one training job; returns (metrics, objects) so tests and sweeps can inspect both."""
    if cfg.get("model") is None:
        raise ConfigError("no model selected: pass `experiment=<name>` (see conf/experiment/) or `model=<name>`")
    pl.seed_everything(cfg.seed, workers=True)
    # Subnormal floats make CPU kernels several times slower (seen: 3-14x on fresh conv weights);
    # flushing them to zero changes results by < 1e-38.
    torch.set_flush_denormal(True)
    out = output_dir(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if rank_zero_only.rank == 0:  # under DDP every rank runs this; one writes
        save_config(cfg, out)

    log.info("data: %s", cfg.data._target_)
    datamodule: pl.LightningDataModule = instantiate(cfg.data, _convert_="all")
    log.info("model: %s", cfg.model._target_)
    model: pl.LightningModule = instantiate(cfg.model, _convert_="all")
    callbacks = instantiate_group(cfg.get("callbacks")) + [ConfigSaver(resolved)]
    loggers = instantiate_group(cfg.get("logger"))
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for lg in loggers:
        lg.log_hyperparams(resolved)

    if cfg.get("train"):
        trainer.fit(model=model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    train_metrics = dict(trainer.callback_metrics)
    tokenizer = getattr(datamodule, "tokenizer", None)
    if tokenizer is not None and trainer.is_global_zero:  # beside the checkpoints (it is inside them too)
        tokenizer.save(out / "tokenizer.json")

    has_test = getattr(datamodule, "has_split", lambda split: True)("test")
    if cfg.get("test") and not has_test:
        log.warning("test=true but the data has no test split (data.test): skipping the test")
    if cfg.get("test") and has_test:
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if not best:
            log.warning("no best checkpoint kept (no monitor?): testing the current weights")
        trainer.test(model=model, datamodule=datamodule, ckpt_path=best or None)
        log.info("tested checkpoint: %s", best or "<current weights>")
    metrics = {k: float(v) for k, v in {**train_metrics, **trainer.callback_metrics}.items()}
    return metrics, {"cfg": cfg, "datamodule": datamodule, "model": model, "trainer": trainer}


def metric_value(metrics: dict, name: str | None) -> float | None:
    """The value sweepers optimise; a clear error when the named metric was never logged."""
    if not name:
        return None
    if name not in metrics:
        raise ConfigError(
            f"optimized_metric={name} was not logged; logged metrics: {', '.join(sorted(metrics)) or 'none'}"
        )
    return metrics[name]


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
@clear_errors
def main(cfg: DictConfig) -> float | None:
    metrics, _ = train(cfg)
    return metric_value(metrics, cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
