"""t2i-demo's terminal: one status line per stage; the stage's own output (warnings, progress bars) goes to
its log file, and a failed stage shows the end of that log."""

from __future__ import annotations

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
