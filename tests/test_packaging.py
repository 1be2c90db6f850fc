"""Packaging: console scripts resolve, the lock pins every dependency, `make install` is idempotent."""

import importlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_console_scripts_resolve():
    scripts = PYPROJECT["project"]["scripts"]
    assert set(scripts) == {"t2i-data", "t2i-train", "t2i-tokenize", "t2i-generate", "t2i-eval", "t2i-sweep-report", "t2i-demo",
                            "t2i-import", "t2i-knowledge", "t2i-caption", "t2i-synthesize", "t2i-app"}
    for target in scripts.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func))


def test_lock_pins_every_dependency():
    pins = lock()
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
    deps = PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["dev"]
    for dep in deps:
        name = re.sub(r"[-_.]+", "-", re.split(r"[<>=!\[ ]", dep)[0]).lower()
        assert name in pins, f"{name} is a dependency but not pinned in requirements.lock"


@pytest.mark.skipif(not (ROOT / ".venv" / ".installed").exists() or shutil.which("make") is None,
                    reason="not installed through `make install`")
def test_make_install_is_up_to_date():
    # `make -q` exits 0 only when the target needs no work: a second `make install` does nothing.
    res = subprocess.run(["make", "-q", "install"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
