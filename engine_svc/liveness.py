"""Liveness that proves progress: the engine judges itself from the engine loop's heartbeat.

The engine loop publishes a heartbeat (the time the last step finished, see engine_loop.py).
When requests are waiting or running and no step has finished for `timeout_s`, the loop is
stalled (a kernel that never returns, a deadlock): the gRPC edge then reports NOT_SERVING,
counts the stall and logs which step it is stuck in; once a step finishes it serves again.
No gRPC and no torch here: server.py owns the health service and polls `LivenessWatch.check`.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from engine_svc.engine import StepStats


class Transition(enum.Enum):
    """A change of the engine's liveness, reported once."""

    STALLED = "stalled"
    MOVING = "moving"


@dataclass(slots=True)
class Progress:
    """What the engine loop shows at one instant (read from another thread: a snapshot)."""

    heartbeat: float            # time.monotonic() when the last step finished
    waiting: int
    running: int
    step: StepStats | None      # the step in progress, None between steps


class LivenessWatch:
    """Turns heartbeats into STALLED / MOVING transitions (one report per change)."""

    def __init__(self, timeout_s: float) -> None:
        if not timeout_s > 0:
            raise ValueError(f"stall timeout must be > 0 seconds, got {timeout_s}")
        self.timeout_s = timeout_s
        self.stalled = False

    def check(self, now: float, progress: Progress) -> Transition | None:
        """STALLED when work has been pending with no finished step for longer than the
        timeout, MOVING when a stalled loop finished a step (or has nothing left to do)."""
        pending = progress.waiting or progress.running
        stuck = bool(pending) and now - progress.heartbeat > self.timeout_s
        if stuck == self.stalled:
            return None
        self.stalled = stuck
        return Transition.STALLED if stuck else Transition.MOVING

    def describe(self, now: float, progress: Progress) -> str:
        """One log line: how long, how much work waits, and the step it is stuck in."""
        step = progress.step
        where = ("between steps (scheduling, metrics or stream hand-over)" if step is None else
                 f"in a {step.phase} step of batch {step.batch_size} ({step.num_tokens} tokens)")
        return (f"engine loop stalled: no step finished for {now - progress.heartbeat:.1f} s "
                f"(--stall-timeout {self.timeout_s:g} s) with {progress.waiting} waiting and "
                f"{progress.running} running requests; stuck {where}")
