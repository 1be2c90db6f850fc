"""Every training run keeps checkpoints/best.ckpt (the monitored best) beside last.ckpt."""

from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import open_dict

from t2i.cli.train import train
from tests.test_train import compose_train


class EpochWeights(pl.Callback):
    """Records, after each real validation, the monitored value and a copy of the weights."""

    def __init__(self, key: str = "val/loss"):
        self.key, self.values, self.weights = key, [], []

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        self.values.append(float(trainer.callback_metrics[self.key]))
        self.weights.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


def run_tiny(tmp_path: Path, overrides: list[str]) -> tuple[Path, EpochWeights]:
    cfg = compose_train(tmp_path, ["model=tiny", "logger=csv", "trainer.max_epochs=4", "trainer.enable_progress_bar=false",
                                   "callbacks.rich_summary=null", "callbacks.image_logger=null", "test=false", *overrides])
    with open_dict(cfg):
        cfg.callbacks.epoch_weights = {"_target_": f"{__name__}.EpochWeights"}
    _, obj = train(cfg)
    recorder = next(c for c in obj["trainer"].callbacks if isinstance(c, EpochWeights))
    return tmp_path / "run" / "checkpoints", recorder


def weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_best_ckpt_holds_the_best_monitored_epoch_and_last_the_final_one(tmp_path):
    # mode=max on a falling loss: the best epoch is an early one, so best and last must differ
    ckpts, rec = run_tiny(tmp_path, ["callbacks.model_checkpoint.monitor=val/loss",
                                     "callbacks.model_checkpoint.mode=max"])
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == ["best.ckpt", "last.ckpt"]
    best_epoch = max(range(len(rec.values)), key=rec.values.__getitem__)
    assert best_epoch < len(rec.values) - 1, f"the loss did not fall: {rec.values}"
    best = torch.load(ckpts / "best.ckpt", map_location="cpu", weights_only=False)
    assert best["epoch"] == best_epoch
    assert_same(best["state_dict"], rec.weights[best_epoch])
    assert_same(weights(ckpts / "last.ckpt"), rec.weights[-1])
    assert (ckpts / "last.ckpt").stat().st_ino != (ckpts / "best.ckpt").stat().st_ino  # a later best keeps its own file
    cb = next(v for k, v in best["callbacks"].items() if "ModelCheckpoint" in k)
    assert cb["best_model_score"].item() == max(rec.values)


def test_best_ckpt_without_a_monitor_is_the_latest(tmp_path):
    ckpts, rec = run_tiny(tmp_path, ["callbacks.model_checkpoint.monitor=null", "trainer.max_epochs=2"])
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == ["best.ckpt", "last.ckpt"]
    assert_same(weights(ckpts / "best.ckpt"), rec.weights[-1])
    assert_same(weights(ckpts / "last.ckpt"), rec.weights[-1])
    # the same state at the same step is written once: last.ckpt is a hard link to best.ckpt
    assert (ckpts / "last.ckpt").stat().st_ino == (ckpts / "best.ckpt").stat().st_ino
