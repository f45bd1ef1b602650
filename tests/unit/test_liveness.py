"""LivenessWatch: a stall is reported once, only with work pending past the timeout, and the
loop is moving again as soon as a step finishes (or nothing is left to do)."""
from __future__ import annotations

import pytest

from engine_svc.engine import StepStats
from engine_svc.liveness import LivenessWatch, Progress, Transition

DECODE = StepStats(phase="decode", batch_size=5, num_tokens=5)


def test_a_stall_needs_pending_work_and_the_whole_timeout() -> None:
    watch = LivenessWatch(timeout_s=2.0)
    assert watch.check(100.0, Progress(heartbeat=90.0, waiting=0, running=0, step=None)) is None
    assert watch.check(100.0, Progress(heartbeat=98.5, waiting=1, running=2, step=DECODE)) is None
    assert not watch.stalled


def test_stalled_once_then_moving_when_a_step_finishes() -> None:
    watch = LivenessWatch(timeout_s=2.0)
    wedged = Progress(heartbeat=98.0, waiting=3, running=5, step=DECODE)
    assert watch.check(99.5, wedged) is None
    assert watch.check(100.5, wedged) is Transition.STALLED and watch.stalled
    assert watch.check(130.0, wedged) is None   # one report per stall
    moved = Progress(heartbeat=130.5, waiting=3, running=5, step=None)
    assert watch.check(131.0, moved) is Transition.MOVING and not watch.stalled
    assert watch.check(131.5, moved) is None


def test_a_stalled_loop_with_nothing_left_to_do_is_not_stalled() -> None:
    watch = LivenessWatch(timeout_s=1.0)
    assert watch.check(10.0, Progress(5.0, 0, 1, DECODE)) is Transition.STALLED
    assert watch.check(11.0, Progress(5.0, 0, 0, None)) is Transition.MOVING


def test_the_log_line_names_the_step_and_the_work() -> None:
    watch = LivenessWatch(timeout_s=30.0)
    line = watch.describe(140.0, Progress(100.0, 3, 5, DECODE))
    assert line == ("engine loop stalled: no step finished for 40.0 s (--stall-timeout 30 s) "
                    "with 3 waiting and 5 running requests; stuck in a decode step of batch 5 "
                    "(5 tokens)")
    assert "between steps" in watch.describe(140.0, Progress(100.0, 0, 1, None))


@pytest.mark.parametrize("timeout_s", [0.0, -1.0, float("nan")])
def test_the_timeout_must_be_positive(timeout_s: float) -> None:
    with pytest.raises(ValueError, match="stall timeout must be > 0 seconds"):
        LivenessWatch(timeout_s)
