"""Scale-out on this CPU: DDP (gloo) equals one process, a real 2-node torchrun, FSDP checkpoints that load
without FSDP, sweeps with a report, Optuna, W&B offline, and SIGTERM + resume=auto (kill -9: test_resume.py)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from t2i.cli.sweep_report import report
from t2i.data.code_datamodule import CodesDataModule
from t2i.lit.transformer import TransformerModule
from tests.test_transformer_train import codes  # noqa: F401  (module fixture: Shapes code shards)

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["logger=csv", "callbacks.image_logger=null", "callbacks.rich_summary=null", "callbacks.lr_monitor=null",
         "trainer.enable_progress_bar=false", "test=false", "trainer.num_sanity_val_steps=0",
         "trainer.precision=32-true", "data.num_workers=0"]
CPU_DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]


def transformer_args(codes_dir, steps: int, batch: int) -> list[str]:
    return ["experiment=shapes_transformer", f"data.codes={codes_dir}", f"data.batch_size={batch}",
            "model.model.n_layer=2", "model.model.d_model=64", "model.model.n_head=2", "model.warmup_steps=0",
            "model.cond_drop_prob=0", "model.ema_decay=null", f"trainer.max_steps={steps}", "trainer.max_epochs=-1",
            f"trainer.val_check_interval={steps}", "trainer.check_val_every_n_epoch=null", *QUIET]


def environ(tmp: Path, **extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "T2I_OUTPUTS": str(tmp / "outputs"), "T2I_DATA": str(tmp / "data"),
           "WANDB_MODE": "offline", "WANDB_SILENT": "true", **extra}
    env.pop("WANDB_API_KEY", None)
    return env


def t2i_train(tmp: Path, args: list[str], nproc: int | None = None, timeout: int = 300, **env) -> subprocess.CompletedProcess:
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc \
        else [sys.executable]
    res = subprocess.run([*launch, "-m", "t2i.cli.train", *args], cwd=tmp, env=environ(tmp, **env),
                         capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res


def recorded(folder: Path, world: int) -> list[list[dict]]:
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(world)]


def summary(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- DDP equals one process with the same global batch ------------------------------------------------------
def test_ddp_transformer_same_losses_as_one_process(tmp_path, codes):  # noqa: F811
    rec = "+callbacks.recorder._target_=tests.recorder.LossRecorder"
    t2i_train(tmp_path, [*transformer_args(codes, 6, 32), rec, f"+callbacks.recorder.path={tmp_path}/one",
                         f"hydra.run.dir={tmp_path}/one"])
    t2i_train(tmp_path, [*transformer_args(codes, 6, 16), *CPU_DDP, rec, f"+callbacks.recorder.path={tmp_path}/two",
                         f"hydra.run.dir={tmp_path}/two"], nproc=2)
    (one,), (r0, r1) = recorded(tmp_path / "one", 1), recorded(tmp_path / "two", 2)
    assert len(one) == len(r0) == len(r1) == 6
    ddp = [(a["train/loss"] + b["train/loss"]) / 2 for a, b in zip(r0, r1)]
    single = [s["train/loss"] for s in one]
    # step 0 has identical weights: the two half batches are exactly the single process's batch
    assert ddp[0] == pytest.approx(single[0], rel=1e-5)
    # every step, rank 0 took the first half of the single process's batch and rank 1 the second half
    assert all(a["batch"] + b["batch"] == s["batch"] for a, b, s in zip(r0, r1, one))
    assert ddp == pytest.approx(single, rel=2e-3)  # Adam's first steps amplify float-order noise slightly
    s1, s2 = summary(tmp_path / "one"), summary(tmp_path / "two")
    assert (s1["world_size"], s2["world_size"]) == (1, 2) and s1["global_step"] == s2["global_step"] == 6
    assert s2["metrics"]["val/loss"] == pytest.approx(s1["metrics"]["val/loss"], rel=2e-3)


def test_ddp_vqgan_gan_phase_same_losses_as_one_process(tmp_path):
    data = ["data.shapes.n_train=64", "data.shapes.n_val=16", "data.shapes.n_test=8", "data.shapes.n_compositional=8",
            "data.image_size=16"]
    args = ["experiment=shapes_vqgan", *data, "model.loss.disc_start=0", "model.loss.disc_norm=actnorm",
            "model.model.quantizer.restart_dead=0", "model.warmup_steps=0",
            "trainer.max_steps=8", "trainer.max_epochs=-1", "trainer.val_check_interval=4",  # 2 optimizer steps a batch
            "trainer.check_val_every_n_epoch=null", "+callbacks.recorder._target_=tests.recorder.LossRecorder",
            "+callbacks.recorder.keys=[train/total_loss,train/disc_loss,train/g_loss]", *QUIET]
    t2i_train(tmp_path, [*args, "data.batch_size=8", f"+callbacks.recorder.path={tmp_path}/one",
                         f"hydra.run.dir={tmp_path}/one"])  # also builds the Shapes data both runs read
    t2i_train(tmp_path, [*args, *CPU_DDP, "data.batch_size=4", f"+callbacks.recorder.path={tmp_path}/two",
                         f"hydra.run.dir={tmp_path}/two"], nproc=2)
    (one,), (r0, r1) = recorded(tmp_path / "one", 1), recorded(tmp_path / "two", 2)
    assert len(one) == len(r0) == 4
    assert all(a["batch"] + b["batch"] == s["batch"] for a, b, s in zip(r0, r1, one))
    for key in ("train/total_loss", "train/disc_loss", "train/g_loss"):  # generator and discriminator steps
        ddp = [(a[key] + b[key]) / 2 for a, b in zip(r0, r1)]
        assert ddp[0] == pytest.approx(one[0][key], rel=1e-4, abs=1e-6), key
        assert ddp == pytest.approx([s[key] for s in one], rel=5e-3, abs=1e-4), key
    assert summary(tmp_path / "two")["metrics"]["val/psnr"] == pytest.approx(
        summary(tmp_path / "one")["metrics"]["val/psnr"], rel=2e-3)


# -- two nodes through experiments/launch/torchrun.sh -------------------------------------------------------
def test_two_node_torchrun_on_localhost(tmp_path, codes):  # noqa: F811
    port = free_port()
    procs = []
    for node in (0, 1):
        env = environ(tmp_path, NNODES="2", NODE_RANK=str(node), NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), RUN_ID="two-nodes", PYTHON=sys.executable)
        procs.append(subprocess.Popen(["bash", str(ROOT / "experiments/launch/torchrun.sh"),
                                       *transformer_args(codes, 4, 16), "trainer.accelerator=cpu"],
                                      cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    run = tmp_path / "outputs" / "shapes_transformer" / "runs" / "two-nodes"
    s = summary(run)
    assert s["world_size"] == 2 and s["num_nodes"] == 2 and s["global_step"] == 4
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4 and ckpt["t2i_config"]["trainer"]["num_nodes"] == 2


# -- FSDP on CPU, checkpoint loads into a plain model ----------------------------------------------------------
def test_fsdp_cpu_checkpoint_loads_without_fsdp(tmp_path, codes):  # noqa: F811
    run = tmp_path / "fsdp"
    args = [a for a in transformer_args(codes, 4, 16) if a != "callbacks.image_logger=null"]
    t2i_train(tmp_path, [*args, "trainer=fsdp", "trainer.accelerator=cpu", "trainer.precision=32-true",
                         "model.sample.num_captions=2", f"hydra.run.dir={run}"], nproc=2)
    # sampling for the image grid ran from gathered weights (a sharded model cannot sample on one rank)
    assert (run / "images" / "val_epoch000_samples.png").exists()
    path = run / "checkpoints" / "last.ckpt"
    state = weights(path)
    plain = TransformerModule.load_from_checkpoint(path, map_location="cpu")  # no process group, no FSDP
    assert set(state) == set(plain.state_dict())
    assert not any("_fsdp" in k or "flat_param" in k for k in state)
    fresh = TransformerModule(**{k: v for k, v in plain.hparams.items()})
    assert any(not torch.equal(state[k], fresh.state_dict()[k]) for k in state)  # trained, not initial weights
    # the plain model's validation loss is the one the sharded run logged with the same weights
    dm = CodesDataModule(codes=str(codes), text_len=plain.model.text_len, batch_size=16)
    val = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False) \
        .validate(plain, datamodule=dm, verbose=False)[0]
    assert val["val/loss"] == pytest.approx(summary(run)["metrics"]["val/loss"], rel=1e-4)


# -- sweeps ----------------------------------------------------------------------------------------------------
def test_grid_sweep_and_report(tmp_path, codes):  # noqa: F811
    t2i_train(tmp_path, ["-m", *transformer_args(codes, 4, 32), "model.model.attention=full,dalle",
                         "run_name=grid"])
    sweep = tmp_path / "outputs" / "shapes_transformer" / "multiruns" / "grid"
    out = report(sweep)
    jobs = {j["overrides"]["model.model.attention"]: j for j in out["jobs"]}
    assert set(jobs) == {"full", "dalle"} and all(j["status"] == "finished" for j in jobs.values())
    assert out["columns"][0] == "val/image_loss" and out["best"] in {"0", "1"}
    md = (sweep / "report.md").read_text()
    for j in jobs.values():
        row = next(line for line in md.splitlines() if line.startswith(f"| {j['job']}"))
        assert f"{j['metrics']['val/image_loss']:.4g}" in row
    assert "model.model.attention" in md and out["plot"].stat().st_size > 5000


def test_optuna_sweep_three_trials(tmp_path, codes):  # noqa: F811
    t2i_train(tmp_path, ["-m", *transformer_args(codes, 3, 32), "hparams_search=transformer_optuna",
                         "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.n_startup_trials=2",
                         "run_name=optuna"])
    sweep = tmp_path / "outputs" / "shapes_transformer" / "multiruns" / "optuna"
    out = report(sweep)
    assert len(out["jobs"]) == 3 and all("val/image_loss" in j["metrics"] for j in out["jobs"])
    best = min(j["metrics"]["val/image_loss"] for j in out["jobs"])
    import yaml
    res = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert res["best_value"] == pytest.approx(best, rel=1e-6)
    assert "Optuna best" in (sweep / "report.md").read_text()


def test_sweep_report_lists_failed_runs(tmp_path):
    for n, status in ((0, "finished"), (1, None)):
        job = tmp_path / str(n)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- model.lr={0.1 * (n + 1)}\n- seed=1\n")
        if status:
            (job / "metrics.json").write_text(json.dumps({"status": status, "metrics": {"val/psnr": 30.5},
                                                          "optimized_metric": "val/psnr"}))
    out = report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "| 1 | 0.2 | — | no metrics.json" in md and "Shared overrides: `seed=1`" in md
    assert out["best"] == "0"
    with pytest.raises(SystemExit, match="no Hydra job folders"):
        report(tmp_path / "0")


def test_sweep_report_shows_each_jobs_time_and_reads_demo_metrics(tmp_path):
    """t2i-demo trials: their metrics.json (the demo's, with `metrics` and `wall_seconds`) and the oracle's
    accuracy as a higher-is-better headline."""
    for n, (acc, secs) in enumerate(((0.894, 391.2), (0.93, 250.0))):
        job = tmp_path / str(n)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- +vqgan.set.data.batch_size={8 * (n + 1)}\n")
        (job / "metrics.json").write_text(json.dumps({
            "status": "finished", "optimized_metric": "reconstruction/oracle_all", "wall_seconds": secs,
            "metrics": {"reconstruction/oracle_all": acc}, "acc_first": 0.5}))
    out = report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert out["best"] == "1" and "(max): job 1" in md
    assert "| time (s) |" in md and "| 0 | 8 | 0.894 | 391 | finished |" in md


# -- W&B offline ------------------------------------------------------------------------------------------------
def wandb_records(path: Path):
    """The protobuf records of an offline ``run-*.wandb`` file (W&B writes LevelDB's log format: 32 KiB
    blocks of CRC + length + type chunks after a 7-byte ``:W&B`` header)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):  # block trailer / padding
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # FULL, FIRST | MIDDLE, LAST
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec


def test_wandb_offline_run_holds_history_and_images(tmp_path, codes):  # noqa: F811
    args = [a for a in transformer_args(codes, 4, 32) if a not in ("logger=csv", "callbacks.image_logger=null")]
    t2i_train(tmp_path, [*args, "logger=wandb", "model.sample.num_captions=4", "trainer.log_every_n_steps=1",
                         f"hydra.run.dir={tmp_path}/run"])
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "offline by default: no API key, nothing uploaded"
    history, config = [], {}
    for rec in wandb_records(next(runs[0].glob("run-*.wandb"))):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append({item.key or "/".join(item.nested_key): item.value_json for item in rec.history.item})
        elif kind == "config":
            config.update({item.key: item.value_json for item in rec.config.update})
    logged = {k for row in history for k in row}
    assert {"train/loss", "val/image_loss", "val/loss"} <= logged
    final = next(row for row in reversed(history) if "val/image_loss" in row)
    assert float(final["val/image_loss"]) == pytest.approx(summary(tmp_path / "run")["metrics"]["val/image_loss"])
    assert "images/filenames" in logged and list(runs[0].rglob("media/images/*.png"))
    assert "model" in config and "shapes_transformer" in config["task_name"]  # the resolved config
    assert (tmp_path / "run" / "wandb" / "run_id").read_text().strip() in runs[0].name  # kept for resume=auto


# -- fault tolerance -------------------------------------------------------------------------------------------
def start_train(tmp: Path, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "t2i.cli.train", *args], cwd=tmp, env=environ(tmp),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"training ended before {path} appeared: {proc.stderr.read()[-3000:]}"
        assert time.time() < end, f"no {path} after {timeout} s"
        time.sleep(0.02)


def test_sigterm_then_resume_auto_equals_an_uninterrupted_run(tmp_path, codes):  # noqa: F811
    """SIGTERM at a racy point (whenever the first checkpoint appears), with EMA, the image logger, dropout
    and caption dropout on. (SIGKILL at fixed points, after a validation and mid-epoch, with every default
    on: tests/test_resume.py.)"""
    steps = 36  # 3 epochs of 12 batches; checkpoints every 5 steps, mid-epoch as well as at epoch ends
    off = ("model.ema_decay=null", "callbacks.image_logger=null", f"trainer.val_check_interval={steps}")
    args = [a for a in transformer_args(codes, steps, 32) if a not in off]
    args = [*args, "trainer.deterministic=true", "model.model.dropout=0.1", "model.cond_drop_prob=0.2",
            "model.sample.num_captions=2", "trainer.val_check_interval=12",
            "+callbacks.model_checkpoint.every_n_train_steps=5"]
    t2i_train(tmp_path, [*args, f"hydra.run.dir={tmp_path}/whole"])
    reference = weights(tmp_path / "whole" / "checkpoints" / "last.ckpt")
    assert any(k.startswith("ema.") for k in reference)

    run = tmp_path / "preempted"
    proc = start_train(tmp_path, [*args, f"hydra.run.dir={run}"])
    wait_for(run / "checkpoints" / "last.ckpt", proc)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    stopped_at = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]
    assert 5 <= stopped_at < steps, f"stopped at step {stopped_at}"
    # the batch finishes, last.ckpt is written, exit 0 with a marker and a summary
    assert proc.returncode == 0, proc.stderr.read()[-3000:]
    assert "SIGTERM" in (run / "PREEMPTED").read_text()
    assert summary(run)["status"] == "preempted" and summary(run)["global_step"] == stopped_at
    assert not list((run / "checkpoints").glob(".*tmp*")), "no half-written checkpoint left behind"

    t2i_train(tmp_path, [*args, "resume=auto", f"hydra.run.dir={run}"])
    s = summary(run)
    assert s["status"] == "finished" and s["global_step"] == steps and not (run / "PREEMPTED").exists()
    resumed = weights(run / "checkpoints" / "last.ckpt")
    for k in reference:  # same data order, same dropout masks, same optimizer state, same EMA
        torch.testing.assert_close(resumed[k], reference[k], rtol=0, atol=1e-6, msg=k)


# -- units: sampler, checkpoint files, launch configs ----------------------------------------------------------
def test_sampler_same_global_batches_at_any_world_size_and_resumes_mid_epoch():
    from t2i.data.sampler import BatchBlockSampler, sample_rng

    data = list(range(50))
    one = BatchBlockSampler(data, batch_size=8, seed=3)
    two = [BatchBlockSampler(data, batch_size=4, rank=r, world=2, seed=3) for r in (0, 1)]
    for s in (one, *two):
        s.set_epoch(2)
    a, (b0, b1) = [i for i, _ in one], ([i for i, _ in s] for s in two)
    assert len(a) == 48 == len(one) * 1 and len(b0) == len(b1) == 24 == len(two[0])  # 2 left over: dropped
    assert all(a[k * 8:(k + 1) * 8] == b0[k * 4:(k + 1) * 4] + b1[k * 4:(k + 1) * 4] for k in range(6))
    assert sorted(a) != a and a != [i for i, _ in BatchBlockSampler(data, batch_size=8, seed=3)]  # epoch 0 differs
    # a sample's random draw depends on (seed, epoch, index) only, whichever rank loads it
    draws = dict(iter(one))
    assert all(draws[i] == d for s in two for i, d in s)
    assert sample_rng((5, 7))[1].random() == sample_rng((5, 7))[1].random() and sample_rng(5) == (5, None)
    one.skip_batches = 2  # resumed after two batches of this epoch: the rest, then full epochs again
    assert [i for i, _ in one] == a[16:] and [i for i, _ in one] == a
    from t2i.data.skips import DataError
    with pytest.raises(DataError, match="fewer than one global batch"):
        BatchBlockSampler(data, batch_size=32, world=2)


def test_atomic_checkpoint_survives_a_failed_write(tmp_path, monkeypatch):
    from t2i.checkpoints import AtomicCheckpointIO

    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def dies_half_way(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, path)
    assert torch.load(path, weights_only=True)["step"] == 1 and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_corrupt_missing_and_mismatched_checkpoints_are_one_clear_error(tmp_path):
    from t2i.checkpoints import CheckpointError, check_fits, resolve_resume

    assert resolve_resume("auto", None, tmp_path) is None  # nothing yet: a fresh start
    (tmp_path / "checkpoints").mkdir()
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.write_bytes(b"PK\x03\x04 truncated by a crash")
    with pytest.raises(CheckpointError, match=f"resume=auto: {last} is corrupt or truncated"):
        resolve_resume("auto", None, tmp_path)
    with pytest.raises(CheckpointError, match="/nope.ckpt does not exist"):
        resolve_resume("/nope.ckpt", None, tmp_path)
    with pytest.raises(CheckpointError, match="either resume or ckpt_path"):
        resolve_resume("auto", "x.ckpt", tmp_path)
    big, small = torch.nn.Linear(4, 3), torch.nn.Linear(4, 2)
    torch.save({"state_dict": big.state_dict(), "t2i_config": {"model": {"_target_": "Big"}}}, last)
    assert resolve_resume("auto", None, tmp_path) == str(last)
    with pytest.raises(CheckpointError, match=r"does not fit this model \(it was made by Big\); shape mismatch "
                                              r"\(2\): weight \(3, 4\) vs model \(2, 4\)"):
        check_fits(last, small)
    check_fits(last, torch.nn.Linear(4, 3))


def test_run_folder_name_is_shared_by_ranks(monkeypatch):
    from t2i.conf import run_id

    for var in ("T2I_RUN_ID", "SLURM_ARRAY_JOB_ID", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's default id names nothing
    assert run_id(None)[:2] == "20"
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert run_id(None) == "4242" and run_id("mine") == "mine"
    monkeypatch.setenv("T2I_RUN_ID", "launch-7")
    assert run_id(None) == "launch-7"


def test_multinode_without_a_launcher_is_a_clear_error(tmp_path, monkeypatch):
    from t2i.distributed import check_launch
    from t2i.errors import ConfigError

    for var in ("LOCAL_RANK", "SLURM_PROCID", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    check_launch(1)
    with pytest.raises(ConfigError, match="trainer.num_nodes=2: launch every node's processes with torchrun or srun"):
        check_launch(2)


def test_slurm_launcher_ties_nodes_and_tasks_to_the_trainer(tmp_path, monkeypatch):
    import submitit
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module("t2i.conf", version_base="1.3"):
        cfg = compose("train", return_hydra_config=True, overrides=[
            "experiment=shapes_transformer", "hydra/launcher=slurm", "trainer=multinode", "trainer.num_nodes=4",
            "trainer.devices=8", f"hydra.sweep.dir={tmp_path}/sweep", "hydra.launcher.partition=gpu"])
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (4, 8, 8)
    # the sbatch script submitit would submit (a stand-in `srun` on PATH: there is no SLURM here)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    ex = submitit.AutoExecutor(folder=tmp_path / "sub", cluster="slurm")
    base = {"timeout_min", "nodes", "tasks_per_node", "gpus_per_node", "cpus_per_task", "mem_gb", "name",
            "stderr_to_stdout"}
    ex.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in launcher.items()
                            if k not in ("_target_", "submitit_folder", "max_num_timeout")})
    script = ex._executor._make_submission_file_text("python -m t2i.cli.train", "0")
    for flag in ("--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu", "--signal=USR2@120"):
        assert f"#SBATCH {flag}" in script, flag


def test_launch_scripts_parse():
    for script in ("torchrun.sh", "slurm.sbatch"):
        res = subprocess.run(["bash", "-n", str(ROOT / "experiments" / "launch" / script)], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
