"""Scale-out on this CPU: DDP (gloo) equals one process, a real 2-node torchrun, FSDP checkpoints that load
without FSDP, sweeps with a report, Optuna, W&B offline, and kill -9 / SIGTERM + resume=auto."""

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


def transformer_args(codes, steps: int, batch: int) -> list[str]:
    return ["experiment=shapes_transformer", f"data.codes={codes}", f"data.batch_size={batch}",
            "model.model.n_layer=2", "model.model.d_model=64", "model.model.n_head=2", "model.warmup_steps=0",
            "model.cond_drop_prob=0", f"trainer.max_steps={steps}", "trainer.max_epochs=-1",
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
    t2i_train(tmp_path, [*transformer_args(codes, 4, 16), "trainer=fsdp", "trainer.accelerator=cpu",
                         "trainer.precision=32-true", f"hydra.run.dir={run}"], nproc=2)
    path = run / "checkpoints" / "last.ckpt"
    state = weights(path)
    plain = TransformerModule.load_from_checkpoint(path, map_location="cpu")  # no process group, no FSDP
    assert set(state) == set(plain.state_dict())
    assert not any("_fsdp" in k or "flat_param" in k for k in state)
    fresh = TransformerModule(**{k: v for k, v in plain.hparams.items()})
    assert any(not torch.equal(state[k], fresh.state_dict()[k]) for k in state)  # trained, not initial weights
    # the plain model's validation loss is the one the sharded run logged with the same weights
    dm = CodesDataModule(codes=str(codes), text_len=24, batch_size=16)
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
                         "hydra.sweeper.params.model\\.model\\.d_model=choice(32,64)", "run_name=optuna"])
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


# -- W&B offline ------------------------------------------------------------------------------------------------
def test_wandb_offline_run_holds_history_and_images(tmp_path, codes):  # noqa: F811
    args = [a for a in transformer_args(codes, 4, 32) if a not in ("logger=csv", "callbacks.image_logger=null")]
    t2i_train(tmp_path, [*args, "logger=wandb", "model.sample.num_captions=4", f"hydra.run.dir={tmp_path}/run"])
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "offline by default: no API key, nothing uploaded"
    from wandb.sdk.internal.datastore import DataStore
    from wandb.proto import wandb_internal_pb2 as pb

    ds = DataStore()
    ds.open_for_scan(str(next(runs[0].glob("run-*.wandb"))))
    history, config = [], None
    while (data := ds.scan_data()) is not None:
        rec = pb.Record()
        rec.ParseFromString(data)
        if rec.WhichOneof("record_type") == "history":
            history.append({item.key or "/".join(item.nested_key): item.value_json for item in rec.history.item})
        elif rec.WhichOneof("record_type") == "config":
            config = {item.key: item.value_json for item in rec.config.update}
    logged = {k for row in history for k in row}
    assert {"train/loss", "val/image_loss"} <= logged
    assert any("images" in k for k in logged) and list(runs[0].rglob("media/images/*.png"))
    assert config is not None and "model" in config  # the resolved config
