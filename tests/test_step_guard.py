"""The bad-step limit stops at the very step it is reached (issue 30 item 12: ``max_bad_steps=3`` used to stop
only after 5 bad steps when the run began just after a read), reading the host only on its regular steps while
training is healthy."""

from __future__ import annotations

import pytest
import torch

from t2i.lit.optim import StepGuard


class Stop(Exception):
    pass


class Optimizer:
    found_inf = None


def run(guard: StepGuard, bad_steps: set[int], steps: int = 40) -> tuple[int | None, int]:
    """Steps ``1..steps``; returns (the step that raised or None, host reads)."""
    reads = 0
    real = torch.stack

    def counting(*a, **k):
        nonlocal reads
        reads += 1
        return real(*a, **k)

    torch.stack = counting
    try:
        for step in range(1, steps + 1):
            guard.after_backward(Optimizer(), torch.tensor(float("nan") if step in bad_steps else 1.0))
            try:
                guard.check(step, lambda n: Stop(n))
            except Stop:
                return step, reads
    finally:
        torch.stack = real
    return None, reads


@pytest.mark.parametrize("max_bad, check_every", [(3, 10), (5, 10), (20, 10), (1, 10), (4, 2)])
def test_stops_at_the_step_the_limit_is_reached_wherever_the_run_starts(max_bad, check_every):
    for first in range(1, 25):
        guard = StepGuard(max_bad, check_every)
        stopped, _ = run(guard, set(range(first, first + 100)), steps=first + 60)
        assert stopped == first + max_bad - 1, (first, stopped)


def test_short_runs_do_not_stop_and_healthy_training_reads_only_on_its_steps():
    guard = StepGuard(3, 10)
    stopped, reads = run(guard, {4, 5, 11, 12, 20, 21}, steps=40)  # runs of 2 < 3
    assert stopped is None
    assert int(guard.skipped) == 6
    healthy = StepGuard(20, 10)
    assert run(healthy, set(), steps=40) == (None, 4)  # steps 10, 20, 30, 40
