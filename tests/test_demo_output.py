"""t2i-demo's terminal: one status line per stage; the stage's own output (warnings, progress bars) goes to
its log file, and a failed stage shows the end of that log."""

from __future__ import annotations

from pathlib import Path

import pytest

from t2i.cli.demo import Stage, StageError, run_stage

NOISY = '''
import sys, warnings
warnings.warn("PossibleUserWarning: the dataloader does not have many workers")
for i in range(3):
    sys.stderr.write(f"\\rEpoch 0: {i}/3 [00:00<00:00]")
sys.stderr.write("\\n")
sys.stderr.flush()
print("wandb: Tracking run with wandb version 0.0 (offline)", flush=True)
if "fail" in sys.argv:
    sys.stderr.write("\\nerror: model.lr must be positive\\n")
    sys.exit(3)
'''


@pytest.fixture
def noisy(tmp_path, monkeypatch):
    (tmp_path / "noisy_stage.py").write_text(NOISY)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    return tmp_path / "out"


def test_stage_output_goes_to_its_log_not_the_terminal(noisy, capfd):
    seconds = run_stage(Stage("vqgan", "noisy_stage", ["a=1"], noisy / "done"), noisy, 1, 6)
    printed = capfd.readouterr()
    assert seconds > 0 and printed.err == ""
    assert printed.out == f"[1/6] vqgan: running (log: {noisy / 'logs' / 'vqgan.log'})\n"
    log = (noisy / "logs" / "vqgan.log").read_text()
    assert "noisy_stage a=1" in log.splitlines()[0]
    for noise in ("PossibleUserWarning", "Epoch 0: 2/3", "wandb: Tracking run"):
        assert noise in log


def test_verbose_mirrors_the_stage_output(noisy, capfd):
    run_stage(Stage("clip", "noisy_stage", [], noisy / "done"), noisy, 4, 6, verbose=True)
    printed = capfd.readouterr().out
    assert "PossibleUserWarning" in printed and "wandb: Tracking run" in printed


def test_failed_stage_shows_the_end_of_its_log(noisy, capfd):
    with pytest.raises(StageError) as e:
        run_stage(Stage("eval", "noisy_stage", ["fail"], noisy / "done"), noisy, 5, 6, tail=3)
    assert str(e.value) == (f"stage eval failed (exit 3); its log is {noisy / 'logs' / 'eval.log'} and its run "
                            f"folder {noisy / 'eval'}")
    err = capfd.readouterr().err.splitlines()
    assert err[0] == f"--- the last 3 lines of {noisy / 'logs' / 'eval.log'} ---"
    assert err[1:] == ["Epoch 0: 2/3 [00:00<00:00]", "wandb: Tracking run with wandb version 0.0 (offline)",
                       "error: model.lr must be positive", "---"]


# -- the stage graph: side by side, skip by command line, rerun what depends on a change, reuse -----------
WORKER = '''
import json, os, sys, time
out, name, value = sys.argv[1], sys.argv[2], sys.argv[3]
time.sleep(float(os.environ.get("STAGE_SLEEP", "0.5")))
os.makedirs(f"{out}/{name}", exist_ok=True)
with open(f"{out}/{name}/metrics.json", "w") as f:
    json.dump({"summary": {"value": float(value)}, "threads": os.environ.get("OMP_NUM_THREADS"),
               "t": [time.time()]}, f)
'''


@pytest.fixture
def graph(tmp_path, monkeypatch):
    """A demo chain of fake stages: a, b independent; c reads a; d reads c and b."""
    import t2i.cli.chain as chain
    import t2i.cli.demo as demo

    (tmp_path / "worker_stage.py").write_text(WORKER)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    values = {"a": 1, "b": 2, "c": 3, "d": 4}

    def fake(cfg, out):
        def make(name, deps):
            return name, deps, lambda: demo.Stage(name, "worker_stage", [str(out), name, str(values[name])],
                                                  out / name / "metrics.json", deps, folders=(name,))
        return [make("a", ()), make("b", ()), make("c", ("a",)), make("d", ("c", "b"))]

    monkeypatch.setattr(demo, "stages", fake)
    monkeypatch.setattr(chain, "cores", lambda: 2)
    return demo, values


def chain_cfg(**kw):
    from omegaconf import OmegaConf

    return OmegaConf.create({"force": False, "jobs": 2, "stages": None, "reuse": None, "verbose": False, **kw})


def read(out, name):
    import json

    return json.loads((out / name / "metrics.json").read_text())


def test_independent_stages_run_side_by_side_with_a_core_each(graph, tmp_path):
    demo, _ = graph
    out = tmp_path / "run"
    records, status, wall = demo.run_chain(chain_cfg(), out)
    assert set(records) == {"a", "b", "c", "d"}
    assert read(out, "a")["threads"] == "1" and read(out, "b")["threads"] == "1"   # started together
    assert read(out, "d")["threads"] == "2"                                         # alone at the end
    assert wall < sum(r["seconds"] for r in records.values())                       # a and b overlapped
    assert status["d"] == "value 4.000"


def test_unchanged_stages_are_skipped_and_a_change_reruns_what_reads_it(graph, tmp_path, capfd):
    demo, values = graph
    out = tmp_path / "run"
    demo.run_chain(chain_cfg(), out)
    before = {n: read(out, n)["t"] for n in "abcd"}
    capfd.readouterr()
    demo.run_chain(chain_cfg(), out)
    assert capfd.readouterr().out.count("done earlier") == 4
    values["a"] = 10                            # a's command line changes: a, c and d rerun, b does not
    demo.run_chain(chain_cfg(), out)
    after = {n: read(out, n)["t"] for n in "abcd"}
    assert [n for n in "abcd" if after[n] != before[n]] == ["a", "c", "d"]


def test_reuse_links_the_equal_stages_of_another_demo(graph, tmp_path, capfd):
    demo, values = graph
    base, trial = tmp_path / "base", tmp_path / "trial"
    demo.run_chain(chain_cfg(), base)
    values["c"] = 30                            # the trial changes c: a and b are linked, c and d run
    capfd.readouterr()
    records, _, _ = demo.run_chain(chain_cfg(reuse=str(base)), trial)
    printed = capfd.readouterr().out
    assert printed.count("reused from") == 2
    assert (trial / "a").is_symlink() and (trial / "b").is_symlink()
    assert not (trial / "c").is_symlink() and read(trial, "c")["summary"]["value"] == 30
    assert read(base, "c")["summary"]["value"] == 3                 # the base demo is untouched
    assert records["a"]["reused_from"] == str(base.resolve())
    values["a"] = 5                             # now a differs: the link is replaced by the trial's own run
    demo.run_chain(chain_cfg(reuse=str(base)), trial)
    assert not (trial / "a").is_symlink() and read(base, "a")["summary"]["value"] == 1


def test_stages_selects_what_they_need_and_unknown_names_are_refused(graph, tmp_path):
    from t2i.errors import ConfigError

    demo, _ = graph
    out = tmp_path / "run"
    records, _, _ = demo.run_chain(chain_cfg(stages=["c"]), out)
    assert set(records) == {"a", "c"}
    with pytest.raises(ConfigError, match="stages=\\['x'\\]: unknown stage 'x'; use some of a, b, c, d"):
        demo.run_chain(chain_cfg(stages=["x"]), out)
    with pytest.raises(ConfigError, match="reuse=.*: not the folder of a finished t2i-demo"):
        demo.run_chain(chain_cfg(reuse=str(tmp_path)), out)


def test_wilson_interval_and_stage_settings():
    from omegaconf import OmegaConf

    from t2i.cli.demo import settings, wilson

    lo, hi = wilson(0.9, 1000)
    assert lo == pytest.approx(0.8798, abs=1e-4) and hi == pytest.approx(0.9171, abs=1e-4)  # by hand: 0.8985 -+ 0.0186
    assert wilson(1.0, 200)[1] == 1.0 and wilson(1.0, 200)[0] < 1.0
    node = OmegaConf.create({"model": {"lr": 0.001, "model": {"d_model": 384}}, "sample": {"cfg_scale": None},
                             "x": [1, 2], "flag": True})
    assert settings(node) == ["model.lr=0.001", "model.model.d_model=384", "sample.cfg_scale=null", "x=[1,2]",
                              "flag=true"]


def demo_stages(*overrides):
    from hydra import compose, initialize_config_dir

    import t2i.cli.demo as demo

    with initialize_config_dir(config_dir=str(Path(demo.__file__).parents[1] / "conf"), version_base="1.3"):
        cfg = compose("demo", overrides=list(overrides))
    out = Path("/nonexistent/demo")
    return cfg, {name: (deps, make) for name, deps, make in demo.stages(cfg, out)}, out


def test_the_vqgan_trains_on_its_own_first_n_images_and_the_rest_on_all():
    cfg, chain, out = demo_stages()
    vq = chain["vqgan"][1]().args
    clip = chain["clip"][1]().args
    assert f"data.shapes.n_train={cfg.vqgan.n_train}" in vq and f"data.shapes.output={out}/data/vqgan_shapes" in vq
    assert f"data.shapes.n_train={cfg.shapes.n_train}" in clip and not any("vqgan_shapes" in a for a in clip)
    data = chain["data"][1]()
    assert f"data.shapes.n_train={cfg.vqgan.n_train}" in data.args   # a changed n_train rebuilds the data
    _, same, _ = demo_stages("vqgan.n_train=null")
    assert same["vqgan"][1]().args[1:8] == same["clip"][1]().args[1:8]   # null: the one benchmark for all


def test_the_demo_defaults_evaluate_1000_captions_in_two_processes_with_guidance():
    cfg, chain, _ = demo_stages()
    assert chain["eval"][0] == ("transformer", "clip")
    assert cfg.eval.num_captions >= 1000 and cfg.eval.processes == 2 and cfg.eval.set.sample.cfg_scale > 1
    from t2i.cli.demo import settings

    flat = settings(cfg.eval.set)
    assert f"sample.cfg_scale={cfg.eval.set.sample.cfg_scale}" in flat
    assert f"sample.temperature={cfg.eval.set.sample.temperature}" in flat


def test_demo_optuna_selects_on_val_and_objective_names_missing_metrics():
    from t2i.cli.demo import objective
    from t2i.errors import ConfigError

    cfg, _, _ = demo_stages("hparams_search=demo_optuna")
    assert list(cfg.eval.splits) == ["val"] and cfg.optimized_metric == "val/acc_rerank"
    m = {"metrics": {"val/acc_rerank": 0.97, "val/acc_first": 0.93}}
    assert objective(m, "val/acc_rerank") == 0.97 and objective(m, None) is None
    with pytest.raises(ConfigError, match="optimized_metric=test/acc_first is not among this demo's metrics"):
        objective(m, "test/acc_first")


FOLLOWER = '''
import json, os, sys, time
out, name, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
seen, t0 = [], time.time()
while time.time() - t0 < seconds:
    with open(os.environ["T2I_THREADS_FILE"]) as f:
        n = f.read().strip()
    if not seen or seen[-1] != n:
        seen.append(n)
    time.sleep(0.05)
os.makedirs(f"{out}/{name}", exist_ok=True)
with open(f"{out}/{name}/metrics.json", "w") as f:
    json.dump({"summary": {"value": 1.0}, "seen": seen}, f)
'''


def test_a_stage_left_alone_is_given_the_freed_core(tmp_path, monkeypatch):
    """The VQGAN and the CLIP start with a core each; once the CLIP ends and nothing else can start, the
    VQGAN's threads file says 2 (t2i-train follows it between batches)."""
    import t2i.cli.chain as chain
    import t2i.cli.demo as demo

    (tmp_path / "follower_stage.py").write_text(FOLLOWER)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    out = tmp_path / "run"

    def fake(cfg, out):
        def make(name, deps, seconds):
            return name, deps, lambda: demo.Stage(name, "follower_stage", [str(out), name, str(seconds)],
                                                  out / name / "metrics.json", deps, folders=(name,))
        return [make("long", (), 3.0), make("short", (), 0.5), make("after", ("long", "short"), 0.3)]

    monkeypatch.setattr(demo, "stages", fake)
    monkeypatch.setattr(chain, "cores", lambda: 2)
    demo.run_chain(chain_cfg(), out)
    assert read(out, "long")["seen"] == ["1", "2"]
    assert read(out, "short")["seen"] == ["1"]
    assert read(out, "after")["seen"] == ["2"]


def test_follow_threads_applies_the_count_in_its_file(tmp_path, monkeypatch):
    import torch

    from t2i.callbacks.threads import FollowThreads, follow_threads
    from t2i.devices import THREADS_ENV

    before = torch.get_num_threads()
    path = tmp_path / "t.threads"
    cb = FollowThreads(path, every_s=0.0)
    try:
        cb.on_train_batch_end()                     # no file yet: nothing changes
        assert torch.get_num_threads() == before
        path.write_text("1\n")
        cb.on_train_batch_end()
        assert torch.get_num_threads() == 1
        path.write_text("junk")                     # unreadable: keeps what it has
        cb.on_validation_batch_end()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    monkeypatch.delenv(THREADS_ENV, raising=False)
    assert follow_threads() == []
    monkeypatch.setenv(THREADS_ENV, str(path))
    assert isinstance(follow_threads()[0], FollowThreads)
