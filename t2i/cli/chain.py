"""Run a chain of stages: subprocesses side by side, each with its share of the cores, skipped when their
recorded command line is unchanged, linked from an earlier run where equal (t2i-demo's runner).

A chain is a list of ``(name, deps, make)``; ``make()`` builds the :class:`Stage` once its dependencies
are done. ``<out>/stages.json`` records each finished stage's arguments (the run folder written as
``${output}``) and seconds; a stage reruns when its arguments changed, ``force`` is set, or a stage it
reads reran. ``reuse=<earlier run>`` links the folders of stages whose arguments equal that run's.
Each stage's output goes to ``<out>/logs/<stage>.log``.

Stages that run side by side get ``cores // running`` threads each; when one ends and nothing new can
start, the others are given its cores through ``<out>/logs/<stage>.threads`` (``$T2I_THREADS_FILE``), which
``t2i-train`` and ``t2i-tokenize`` follow between batches (:class:`t2i.devices.ThreadsFile`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from t2i.devices import THREADS_ENV
from t2i.errors import ConfigError, T2IError


class StageError(T2IError):
    """A stage's process failed; its log is named."""


@dataclass
class Stage:
    name: str
    module: str                     # the console module run as a subprocess (``python -m <module> <args>``)
    args: list[str]
    done: Path                      # exists when the stage finished
    deps: tuple[str, ...] = ()      # the stages whose outputs it reads
    folders: tuple[str, ...] = ()   # what it writes under <output> (linked into a run that reuses it)
    threads: int | None = None      # OMP / MKL threads of each of its processes (None: the library's default)
    processes: int = 1              # processes it starts (DDP ranks, torchrun workers): they share its cores
    call: Callable[[], object] | None = None  # in-process work instead of a module (the data stage)


def stage_log(out: Path, name: str) -> Path:
    return out / "logs" / f"{name}.log"


class Running:
    """One stage's process, its output pumped into its log file (and the terminal when ``verbose``)."""

    def __init__(self, stage: Stage, out: Path, index: int, total: int, verbose: bool = False):
        self.stage, self.out, self.verbose = stage, out, verbose
        self.cmd = [sys.executable, "-m", stage.module, *stage.args]
        self.log_path = stage_log(out, stage.name)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        note = f", {stage.threads} thread{'s' * (stage.threads != 1)}" if stage.threads else ""
        print(f"[{index}/{total}] {stage.name}: running (log: {self.log_path}{note})", flush=True)
        env = dict(os.environ)
        self.threads_file = out / "logs" / f"{stage.name}.threads"
        if stage.threads:
            env.update({"OMP_NUM_THREADS": str(stage.threads), "MKL_NUM_THREADS": str(stage.threads),
                        THREADS_ENV: str(self.threads_file)})
            self.threads_file.write_text(f"{stage.threads}\n")
        self.t0 = time.perf_counter()
        self.log_file = open(self.log_path, "wb")
        self.log_file.write(f"$ {' '.join(self.cmd)}\n".encode())
        self.log_file.flush()
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        self.pump = threading.Thread(target=self._pump, daemon=True)
        self.pump.start()

    def set_threads(self, n: int) -> bool:
        """Ask the stage's processes to run ``n`` threads each from now on (``t2i-train`` and ``t2i-tokenize``
        follow the file: :class:`t2i.devices.ThreadsFile`); True when that changed the count."""
        if not self.stage.threads or n == self.stage.threads or self.proc.poll() is not None:
            return False
        self.stage.threads = n
        tmp = self.threads_file.with_suffix(".tmp")
        tmp.write_text(f"{n}\n")
        tmp.replace(self.threads_file)
        return True

    def _pump(self) -> None:
        for chunk in iter(lambda: self.proc.stdout.read1(1 << 16), b""):
            self.log_file.write(chunk)
            if self.verbose:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()

    def finish(self, tail: int = 25) -> float:
        """Wait for the process; its seconds, or :class:`StageError` naming its log."""
        code = self.proc.wait()
        self.pump.join()
        self.log_file.close()
        seconds = time.perf_counter() - self.t0
        if code != 0:
            text = self.log_path.read_text(encoding="utf-8", errors="replace").replace("\r", "\n")
            lines = [ln for ln in text.splitlines() if ln.strip()][-tail:]
            if not self.verbose:
                print(f"--- the last {len(lines)} lines of {self.log_path} ---", *lines, "---", sep="\n",
                      file=sys.stderr)
            raise StageError(f"stage {self.stage.name} failed (exit {code}); its log is {self.log_path} and its "
                             f"run folder {self.out / self.stage.name}")
        return seconds


def run_stage(stage: Stage, out: Path, index: int, total: int, verbose: bool = False, tail: int = 25) -> float:
    """Run one stage to its end (see :class:`Running`); its seconds."""
    return Running(stage, out, index, total, verbose).finish(tail)


def normalized(args: list[str], *roots: Path) -> list[str]:
    """A stage's arguments with its demo folder (or the one it was reused from) written as ``${output}``:
    equal lists mean the same work."""
    out = []
    for a in args:
        for root in roots:
            a = a.replace(str(root), "${output}")
        out.append(a)
    return out


def read_records(folder: Path) -> dict:
    path = folder / "stages.json"
    return json.loads(path.read_text()) if path.exists() else {}


def link_from(reused: Path, out: Path, stage: Stage) -> None:
    """Make ``stage``'s folders (and its log) in ``out`` links to those of the earlier demo ``reused``."""
    for name in (*stage.folders, f"logs/{stage.name}.log"):
        dst, src = out / name, reused / name
        if not src.exists():
            continue
        clear(dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(src.resolve(), target_is_directory=src.is_dir())


def clear(path: Path) -> None:
    """Remove ``path`` if it is a link (never what it points to)."""
    if path.is_symlink():
        path.unlink()


def selected(cfg: DictConfig, chain: list) -> list[str]:
    """The stage names to run: ``stages`` (all by default) and everything they depend on, in chain order."""
    deps = {name: d for name, d, _ in chain}
    want = list(cfg.get("stages") or deps)
    unknown = [w for w in want if w not in deps]
    if unknown:
        raise ConfigError(f"stages={want}: unknown stage {unknown[0]!r}; use some of {', '.join(deps)}")
    need: set[str] = set()
    todo = list(want)
    while todo:
        name = todo.pop()
        if name not in need:
            need.add(name)
            todo += deps[name]
    return [name for name in deps if name in need]


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_chain(chain: list, cfg: DictConfig, out: Path, stage_status: Callable[[str, Path], str],
              done_in: Callable[[Stage, Path, Path], Path]) -> tuple[dict, dict, float]:
    """Run (or reuse) every selected stage, up to ``jobs`` at a time, each with its share of the cores.
    Returns the stage records, their status lines and this invocation's wall seconds."""
    names = selected(cfg, chain)
    deps = {name: d for name, d, _ in chain}
    make = {name: m for name, _, m in chain}
    records = read_records(out)
    reuse = Path(str(cfg.reuse)).expanduser().resolve() if cfg.get("reuse") else None
    if reuse is not None and not (reuse / "stages.json").is_file():
        raise ConfigError(f"reuse={cfg.reuse}: not the folder of a finished t2i-demo (no stages.json there)")
    earlier = read_records(reuse) if reuse else {}
    jobs = max(1, int(cfg.get("jobs", 1)))
    state: dict[str, str] = {}     # name -> current | reused | ran
    status: dict[str, str] = {}
    running: dict[str, Running] = {}
    pending = list(names)
    t_start = time.perf_counter()
    total = len(names)

    def settle(name: str, how: str, seconds: float, stage: Stage, source: Path | None = None) -> None:
        state[name] = how
        rec = {"args": normalized(stage.args, out, *([reuse] if reuse else [])), "seconds": round(seconds, 1)}
        if source is not None:
            rec["reused_from"] = str(source)
        records[name] = rec
        (out / "stages.json").write_text(json.dumps(records, indent=2))
        status[name] = stage_status(name, out)

    try:
        while pending or running:
            ready = [n for n in pending if all(state.get(d) for d in deps[n])]
            starting = []
            for name in ready:
                stage = make[name]()
                index = names.index(name) + 1
                key = normalized(stage.args, out, *([reuse] if reuse else []))
                fresh = not cfg.force and not any(state[d] == "ran" for d in deps[name])
                mine = records.get(name, {})
                if fresh and stage.done.exists() and mine.get("args") == key:
                    pending.remove(name)
                    state[name] = "current"
                    status[name] = stage_status(name, out)
                    print(f"[{index}/{total}] {name}: done earlier ({mine.get('seconds', 0):.0f} s): "
                          f"{status[name]}", flush=True)
                    continue
                theirs = earlier.get(name, {})
                if fresh and reuse and theirs.get("args") == key and done_in(stage, out, reuse).exists():
                    pending.remove(name)
                    link_from(reuse, out, stage)
                    settle(name, "reused", theirs.get("seconds", 0.0), stage, reuse)
                    print(f"[{index}/{total}] {name}: reused from {reuse} ({theirs.get('seconds', 0):.0f} s "
                          f"there): {status[name]}", flush=True)
                    continue
                if stage.call is not None:  # in-process (the data): alone, before the stages that read it
                    if not running and not starting:
                        pending.remove(name)
                        for folder in stage.folders:
                            clear(out / folder)
                        print(f"[{index}/{total}] {name}: running", flush=True)
                        t0 = time.perf_counter()
                        stage.call()
                        settle(name, "ran", time.perf_counter() - t0, stage)
                        print(f"[{index}/{total}] {name}: {records[name]['seconds']:.0f} s: {status[name]}",
                              flush=True)
                elif len(running) + len(starting) < jobs:
                    starting.append((name, stage, index))
            if any(n not in pending for n in ready):
                continue  # settled stages may have made others ready
            share = max(1, cores() // max(1, len(running) + len(starting)))
            if starting:
                for other in running.values():  # a stage that was given freed cores shares them again
                    other.set_threads(max(1, share // other.stage.processes))
            for name, stage, index in starting:
                pending.remove(name)
                for folder in stage.folders:
                    clear(out / folder)  # a link from a reused demo: this run writes its own
                clear(stage_log(out, name))
                stage.threads = max(1, share // stage.processes) if jobs > 1 or stage.processes > 1 else None
                running[name] = Running(stage, out, index, total, verbose=bool(cfg.get("verbose", False)))
            if not running:
                if pending:
                    raise StageError(f"stages {pending} cannot start")  # unreachable: the chain has no cycles
                break
            name = wait_any(running)
            proc = running.pop(name)
            try:
                seconds = proc.finish()
            except StageError:
                for other in running.values():
                    other.proc.terminate()
                raise
            settle(name, "ran", seconds, proc.stage)
            print(f"[{names.index(name) + 1}/{total}] {name}: {seconds:.0f} s: {status[name]}", flush=True)
            if running and not any(n in pending and all(state.get(d) for d in deps[n]) for n in names):
                share = max(1, cores() // len(running))  # nothing new can start: the freed cores go to the rest
                for other in running.values():
                    if other.set_threads(max(1, share // other.stage.processes)):
                        print(f"[{names.index(other.stage.name) + 1}/{total}] {other.stage.name}: now "
                              f"{other.stage.threads} threads each ({name} finished)", flush=True)
    finally:
        for other in running.values():
            other.proc.terminate()
    return records, status, time.perf_counter() - t_start


def wait_any(running: dict) -> str:
    """The name of a running stage whose process has ended (waits for the first one)."""
    while True:
        for name, proc in running.items():
            if proc.proc.poll() is not None:
                return name
        time.sleep(0.2)
