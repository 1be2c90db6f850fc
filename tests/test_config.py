"""Hydra config tree: every group composes, every instantiable group instantiates."""

from pathlib import Path

import pytest
import pytorch_lightning as pl
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import OmegaConf

from t2i.cli.common import instantiate_group

CONF = Path(__file__).resolve().parents[1] / "t2i" / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def make(overrides=(), tmp_path=None):
    with initialize_config_module("t2i.conf", version_base="1.3"):
        extra = [f"paths.output_dir={tmp_path}", f"paths.data_dir={tmp_path}/data"] if tmp_path else []
        return compose("train", overrides=[*extra, *overrides])


def test_groups_exist():
    for group in ("data", "trainer", "logger", "callbacks", "debug", "paths", "hydra"):
        assert options(group), f"conf/{group}/ is empty"
    assert {"default", "cpu", "gpu", "ddp"} <= set(options("trainer"))
    assert {"wandb", "csv"} <= set(options("logger"))
    assert {"fdr", "overfit", "limit"} <= set(options("debug"))
    assert {"shapes", "muge", "coco_cn", "easynlp_tsv", "folder", "wds"} <= set(options("data"))


def test_defaults(tmp_path):
    cfg = make(tmp_path=tmp_path)
    assert cfg.get("model") is None and cfg.get("experiment") is None
    assert cfg.data._target_ == "t2i.data.datamodule.ImageTextDataModule"
    assert cfg.logger.wandb.offline is None  # auto: offline unless an API key is configured (test below)
    assert cfg.data.shapes.output == f"{tmp_path}/data/shapes_64_zh"
    OmegaConf.resolve(cfg)  # every interpolation resolves


@pytest.mark.parametrize("data", options("data"))
@pytest.mark.parametrize("trainer", options("trainer"))
def test_every_data_trainer_pair_composes(tmp_path, data, trainer):
    extra = ["data.codes=somewhere"] if data == "codes" else []  # stage 2: the codes folder is required
    cfg = make([f"data={data}", f"trainer={trainer}", *extra], tmp_path)
    OmegaConf.resolve(cfg)
    assert cfg.trainer._target_ == "pytorch_lightning.Trainer"
    assert cfg.data.batch_size > 0 and (data == "codes" or cfg.data.image_size > 0)


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes_and_resolves(tmp_path, experiment):
    cfg = make([f"experiment={experiment}"], tmp_path)
    OmegaConf.resolve(cfg)
    assert cfg.task_name == experiment and cfg.model._target_.startswith("t2i.lit.")
    assert cfg.callbacks.model_checkpoint.monitor == cfg.optimized_metric
    if experiment.endswith("_large"):
        assert cfg.model.model.n_layer == 24 and cfg.model.model.d_model == 1024


@pytest.mark.parametrize("debug", options("debug"))
def test_debug_configs(tmp_path, debug):
    cfg = make([f"debug={debug}"], tmp_path)
    assert cfg.task_name == "debug"
    if debug == "fdr":
        assert cfg.trainer.fast_dev_run is True and cfg.logger is None


@pytest.mark.parametrize("trainer", ["default", "cpu", "ddp"])
def test_trainers_instantiate_on_cpu(tmp_path, trainer):
    overrides = [f"trainer={trainer}"]
    if trainer == "ddp":
        overrides += ["trainer.accelerator=cpu", "trainer.precision=32-true"]
    cfg = make(overrides, tmp_path)
    t = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert isinstance(t, pl.Trainer)
    if trainer == "ddp":
        assert t.num_devices == 2 and type(t.strategy).__name__ == "DDPStrategy"


def test_gpu_trainer_config():
    # No GPU here: check the config says what it should; instantiating it needs CUDA.
    with initialize_config_module("t2i.conf", version_base="1.3"):
        cfg = compose("train", overrides=["trainer=gpu"])
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"


@pytest.mark.parametrize("logger", options("logger"))
def test_loggers_instantiate(tmp_path, logger, monkeypatch):
    from t2i.cli.train import build_loggers

    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    cfg = make([f"logger={logger}"], tmp_path)
    loggers = build_loggers(cfg.logger, tmp_path)
    assert len(loggers) == 1 and isinstance(loggers[0], pl.loggers.Logger)
    if logger == "wandb":
        lg = loggers[0]
        assert lg._offline is True and lg._log_model is False and lg._wandb_init["project"] == "t2i"
        assert lg._wandb_init["id"] == (tmp_path / "wandb" / "run_id").read_text().strip()


def test_callbacks_instantiate(tmp_path):
    cfg = make([], tmp_path)
    callbacks = instantiate_group(cfg.callbacks)
    names = {type(c).__name__ for c in callbacks}
    assert {"ModelCheckpoint", "LearningRateMonitor", "DataReport"} <= names
    assert instantiate_group(make(["callbacks=none"], tmp_path).callbacks) == []


def test_bad_override_is_a_clear_error(tmp_path):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="trainer"):
        make(["trainer=tpu_pod"], tmp_path)


def test_wandb_is_offline_unless_a_key_is_configured(tmp_path, monkeypatch):
    from t2i.cli.train import wandb_online

    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert not wandb_online()
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password k\n")  # `wandb login`
    assert wandb_online()
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert not wandb_online()
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_online()
