"""Exact resumption with the default settings on: SIGKILL after the first validation of the second epoch
and at a mid-epoch step, then ``resume=auto``, gives every model, EMA and optimizer tensor of an
uninterrupted run (atol 1e-6). The image logger, EMA, caption dropout, dropout, the sanity check and
``trainer.deterministic=true`` stay on; the image tokenizer is built lazily at the first validation (or
checkpoint) of each process, so a resumed process builds it at a different point than the uninterrupted
one -- that must not move the training random stream."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from t2i.cli.train import train
from tests.test_scale import environ, wait_for
from tests.test_transformer_train import codes  # noqa: F401  (module fixture: Shapes code shards)

ATOL = 1e-6
KILLER = "+callbacks.killer._target_=tests.killer.Killer"
COMMON = ["logger=csv", "callbacks.rich_summary=null", "trainer.enable_progress_bar=false", "test=false",
          "trainer.deterministic=true"]


def every_n_steps(n: int) -> list[str]:
    """A second last.ckpt writer, every ``n`` training steps (the run's own writes it at validations)."""
    return ["+callbacks.steps._target_=pytorch_lightning.callbacks.ModelCheckpoint",
            "+callbacks.steps.dirpath=${paths.output_dir}/checkpoints", "+callbacks.steps.filename=last",
            f"+callbacks.steps.every_n_train_steps={n}", "+callbacks.steps.enable_version_counter=false"]


def start_killed(tmp: Path, args: list[str]) -> subprocess.Popen:
    """A training process (``t2i-train``) that the ``Killer`` callback ends with SIGKILL."""
    return subprocess.Popen([sys.executable, "-m", "t2i.cli.train", *args], cwd=tmp, env=environ(tmp),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def train_here(tmp: Path, args: list[str], folder: Path) -> None:
    """The same ``t2i-train`` job in this process (no interpreter start-up: the uninterrupted and the
    resumed runs need no killing)."""
    with initialize_config_module("t2i.conf", version_base="1.3"):
        cfg = compose("train", overrides=[*args, f"paths.output_dir={folder}", f"paths.data_dir={tmp}/data"])
    try:
        train(cfg)
    finally:
        torch.use_deterministic_algorithms(False)  # trainer.deterministic=true set it for the process


def tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every weight (model, EMA, discriminator), buffer, optimizer moment and step of a checkpoint."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    out = {f"state_dict.{k}": v for k, v in ckpt["state_dict"].items()}
    for i, opt in enumerate(ckpt["optimizer_states"]):
        for p, state in opt["state"].items():
            out.update({f"optimizer{i}.{p}.{k}": torch.as_tensor(v) for k, v in state.items()})
    for i, sched in enumerate(ckpt["lr_schedulers"]):
        out[f"scheduler{i}.last_epoch"] = torch.as_tensor(sched["last_epoch"])
    out["global_step"] = torch.as_tensor(ckpt["global_step"])
    return out


def assert_same(resumed: dict, reference: dict, what: str) -> None:
    assert set(resumed) == set(reference), what
    for k, ref in reference.items():
        torch.testing.assert_close(resumed[k].float(), ref.float(), rtol=0, atol=ATOL, msg=f"{what}: {k}")


def kill_and_resume(tmp: Path, args: list[str], kill_points: dict[str, tuple[int, int]],
                    data_ready: bool = True) -> dict:
    """One uninterrupted run, and per kill point (epoch, batch index) a run killed there with SIGKILL
    and resumed with resume=auto; the final checkpoints must agree. With ``data_ready`` the killed
    processes run while the uninterrupted one trains here (else after it, which builds the data)."""
    def start():
        return {name: start_killed(tmp, [*args, KILLER, f"+callbacks.killer.epoch={epoch}",
                                         f"+callbacks.killer.batch={batch}", f"hydra.run.dir={tmp / name}"])
                for name, (epoch, batch) in kill_points.items()}

    procs = start() if data_ready else {}
    train_here(tmp, args, tmp / "whole")
    procs = procs or start()
    reference = tensors(tmp / "whole" / "checkpoints" / "last.ckpt")
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == -signal.SIGKILL, err[-3000:]
        folder = tmp / name
        assert not (folder / "metrics.json").exists()
        stopped = torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert 0 < stopped["global_step"] < reference["global_step"], name
        train_here(tmp, [*args, "resume=auto"], folder)
        assert_same(tensors(folder / "checkpoints" / "last.ckpt"), reference, name)
    return reference


def test_transformer_kill_9_resumes_exactly_with_defaults(tmp_path, codes):  # noqa: F811
    # 6 steps of 32 an epoch, 2 epochs; validation (and a checkpoint) every half epoch, a checkpoint every 2
    # steps too; EMA 0.995, caption dropout 0.1 and the image logger are the experiment's (fp32 for speed)
    args = ["experiment=shapes_transformer", f"data.codes={codes}", "model.model.n_layer=2", "model.model.d_model=64",
            "model.model.n_head=2", "model.model.dropout=0.1", "model.sample.num_captions=2", "trainer.max_epochs=2",
            "+trainer.limit_train_batches=6", "+trainer.limit_val_batches=1", "trainer.val_check_interval=0.5",
            "trainer.precision=32-true", *every_n_steps(2), *COMMON,
            "+callbacks.lazy_build._target_=tests.killer.LazyBuild"]  # a metrics callback's lazy scorer build
    # right after the first validation of the second epoch and its checkpoint (step 9); mid-epoch at step 9
    # (last checkpoint: step 8; the resumed process then makes its lazy build at step 9's validation, the
    # uninterrupted one at step 3's, and trains 3 more steps)
    ref = kill_and_resume(tmp_path, args, {"after_validation": (1, 3), "mid_epoch": (1, 2)})
    assert int(ref["global_step"]) == 12 and any(k.startswith("state_dict.ema.") for k in ref)
    assert list((tmp_path / "mid_epoch" / "images").glob("val_epoch001_*.png")), "the image logger ran"


@pytest.mark.slow
def test_vqgan_gan_phase_kill_9_resumes_exactly(tmp_path):
    # 64 images at 16 px, batch 8: 8 batches an epoch; the discriminator starts at batch 4 (the GAN phase:
    # two optimizer steps a batch), dead codes restart after 6 unused batches
    args = ["experiment=shapes_vqgan", "data.shapes.n_train=64", "data.shapes.n_val=16", "data.shapes.n_test=8",
            "data.shapes.n_compositional=8", "data.image_size=16", "model.loss.disc_start=4",
            "model.model.quantizer.restart_dead=6", "trainer.max_epochs=2", "trainer.val_check_interval=0.5",
            *every_n_steps(6), *COMMON]
    ref = kill_and_resume(tmp_path, args, {"after_validation": (1, 4), "mid_epoch": (1, 7)}, data_ready=False)
    assert any(k.startswith("optimizer1.") for k in ref), "the discriminator's optimizer stepped"


@pytest.mark.slow
def test_clip_kill_9_resumes_exactly(tmp_path):
    args = ["experiment=shapes_clip", "data.shapes.n_train=96", "data.shapes.n_val=16", "data.shapes.n_test=8",
            "data.shapes.n_compositional=8", "data.image_size=16", "data.batch_size=16", "trainer.max_epochs=2",
            "trainer.val_check_interval=0.5", "model.model.vision_layers=1", "model.model.text_layers=1",
            *every_n_steps(4), *COMMON]
    kill_and_resume(tmp_path, args, {"after_validation": (1, 3), "mid_epoch": (1, 5)}, data_ready=False)


def test_sigusr2_preempts_and_a_resumed_run_ending_before_validation_exits_0(tmp_path, codes):  # noqa: F811
    """submitit (hydra/launcher=slurm) sends SIGUSR2 before the time limit: the batch finishes, last.ckpt
    is written, exit 0. The resumed run stops at max_steps=6, before its first validation (an epoch is
    12 steps): exit 0 with a warning instead of "optimized_metric=val/image_loss was not logged"."""
    folder = tmp_path / "run"
    args = ["experiment=shapes_transformer", f"data.codes={codes}", "model.model.n_layer=2", "model.model.d_model=64",
            "model.model.n_head=2", "trainer.precision=32-true", *every_n_steps(1), *COMMON, f"hydra.run.dir={folder}"]
    proc = subprocess.Popen([sys.executable, "-m", "t2i.cli.train", *args, "trainer.max_steps=40"], cwd=tmp_path,
                            env=environ(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(folder / "checkpoints" / "last.ckpt", proc)  # training runs: the handler is installed
    proc.send_signal(signal.SIGUSR2)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    stopped = torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]
    assert 1 <= stopped < 6 and "SIGUSR2" in (folder / "PREEMPTED").read_text()

    res = subprocess.run([sys.executable, "-m", "t2i.cli.train", *args, "trainer.max_steps=6", "resume=auto"],
                         cwd=tmp_path, env=environ(tmp_path), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "optimized_metric=val/image_loss: the run logged no val/ metrics (it ended before the first validation)" \
        in res.stdout + res.stderr
    s = json.loads((folder / "metrics.json").read_text())
    assert s["status"] == "finished" and s["global_step"] == 6 and not (folder / "PREEMPTED").exists()


def test_preemption_hands_the_signal_on_to_the_launchers_handler_after_the_checkpoint(tmp_path):
    """Under submitit the USR2 handler it installed requeues the job: it must still run, after last.ckpt."""
    import os

    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from t2i.callbacks.resume import Preempted, Preemption

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    seen = []

    def launcher_handler(signum, frame):  # stands in for submitit's checkpoint_and_try_requeue
        seen.append((signal.Signals(signum).name, (tmp_path / "checkpoints" / "last.ckpt").exists()))

    class SendAtStep2(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:
                os.kill(os.getpid(), signal.SIGUSR2)

    previous = signal.signal(signal.SIGUSR2, launcher_handler)
    try:
        trainer = pl.Trainer(accelerator="cpu", max_steps=20, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=tmp_path,
                             callbacks=[Preemption(), SendAtStep2(),
                                        pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "checkpoints")])
        with pytest.raises(Preempted, match="SIGUSR2"):
            trainer.fit(Tiny(), train_dataloaders=DataLoader(torch.randn(64, 2), batch_size=4))
        assert seen == [("SIGUSR2", True)] and "SIGUSR2 at step 3" in (tmp_path / "PREEMPTED").read_text()
        assert signal.getsignal(signal.SIGUSR2) is launcher_handler  # restored after the fit
    finally:
        signal.signal(signal.SIGUSR2, previous)
