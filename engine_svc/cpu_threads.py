"""How many threads the CPU engine uses: from the CPUs it may run on, then from who else is busy.

Two decisions, both logged:
- At start, `usable_cpus()` counts the CPUs this process may really use: its affinity mask
  (taskset, a Kubernetes static CPU policy) and its cgroup's `cpu.max` quota (a Kubernetes CPU
  limit), not `nproc`.
- While serving, `ThreadGovernor` samples /proc every half second: the machine's busy time minus
  this process's own CPU time is what other processes use. OpenMP teams wait for their slowest
  thread at every barrier; when another busy process shares a core, one of the team's threads is
  descheduled for a whole time slice at a time and every parallel region waits for it (a 2-core
  machine with one busy neighbour went from ~300 to 4 tok/s). So the governor runs the team on
  the cores others leave free (at least one thread), and goes back up when they are free again.
  It also reads the CPU budget again at each sample, so a quota lowered or raised after start
  (a resized Kubernetes pod, `systemctl set-property`) resizes the team. It measures only while the engine is stepping: time spent idle (waiting for requests) is left
  out, or a neighbour that runs while the engine waits (a benchmark's other half, a batch job
  between bursts) would read as contention and hold the engine at one thread once it is back.
"""
from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(slots=True, frozen=True)
class CpuBudget:
    """CPUs the engine may use, and what limited them."""

    cpus: int
    affinity: int
    quota: float | None      # cgroup CPU quota in CPUs (None: no quota)

    @property
    def source(self) -> str:
        if self.quota is not None and math.ceil(self.quota) < self.affinity:
            return f"cgroup cpu.max quota {self.quota:g} CPUs"
        return f"affinity mask {self.affinity} CPUs"


def _own_cgroups(proc_cgroup: Path) -> tuple[str | None, str | None]:
    """(v2 path, v1 cpu controller path) of this process's cgroups, from /proc/self/cgroup."""
    v2 = v1 = None
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def _quota_at(directory: Path) -> float | None:
    """The quota set on one cgroup directory (v2 cpu.max or v1 cfs files), None if unlimited."""
    try:
        quota, period = (directory / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((directory / "cpu.cfs_quota_us").read_text())
        period_us = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us


def cgroup_quota(root: Path = Path("/sys/fs/cgroup"),
                 proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The tightest CPU quota (in CPUs) on this process's cgroup and its ancestors, v2 or v1;
    None when nothing limits it."""
    v2, v1 = _own_cgroups(proc_cgroup)
    candidates = []
    if v2 is not None:
        candidates.append(root / v2.lstrip("/"))
        candidates.append(root / "unified" / v2.lstrip("/"))
    if v1 is not None:
        candidates.append(root / "cpu" / v1.lstrip("/"))
    quotas = []
    for leaf in candidates:
        for directory in (leaf, *leaf.parents):
            quota = _quota_at(directory)
            if quota is not None:
                quotas.append(quota)
            if directory == root:
                break
    return min(quotas, default=None)


def usable_cpus(cgroup_root: Path = Path("/sys/fs/cgroup"),
                proc_cgroup: Path = Path("/proc/self/cgroup")) -> CpuBudget:
    """CPUs from the affinity mask, capped by the cgroup quota (rounded up, at least 1)."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count() or 1
    quota = cgroup_quota(cgroup_root, proc_cgroup)
    cpus = affinity if quota is None else max(1, min(affinity, math.ceil(quota - 1e-9)))
    return CpuBudget(cpus=cpus, affinity=affinity, quota=quota)


def machine_busy_seconds(stat: Path = Path("/proc/stat")) -> float:
    """CPU-seconds every process on the machine has run (all CPUs; steal counts as busy)."""
    fields = stat.read_text().split("\n", 1)[0].split()
    # cpu user nice system idle iowait irq softirq steal [guest guest_nice: inside user/nice]
    ticks = [int(v) for v in fields[1:9]]
    busy = ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6] + ticks[7]
    return busy / _CLOCK_TICKS


def own_busy_seconds() -> float:
    """CPU-seconds this process (every thread) has run."""
    times = os.times()
    return times.user + times.system


class ThreadGovernor:
    """Sets the engine's thread count from the cores other processes leave free."""

    def __init__(self, max_threads: int, set_threads: Callable[[int], None], *,
                 interval_s: float = 0.5, confirm: int = 2,
                 machine_busy: Callable[[], float] = machine_busy_seconds,
                 own_busy: Callable[[], float] = own_busy_seconds,
                 clock: Callable[[], float] = time.monotonic,
                 cpu_budget: Callable[[], int] | None = None) -> None:
        """max_threads: the most threads ever run; interval_s: stepping time per sample;
        confirm: samples in a row that must agree on a change; cpu_budget: read at each sample,
        the CPUs this process may use now (a cgroup quota lowered or raised after start)."""
        if max_threads < 1:
            raise ValueError(f"max_threads must be >= 1, got {max_threads}")
        self.max_threads = max_threads
        self.threads = max_threads
        self.others_cpus = 0.0           # last sample: CPUs other processes kept busy
        self.budget_cpus = max_threads   # last sample: CPUs usable now (affinity, cgroup quota)
        self._set_threads = set_threads
        self._interval_s, self._confirm = interval_s, confirm
        self._machine_busy, self._own_busy, self._clock = machine_busy, own_busy, clock
        self._cpu_budget = cpu_budget
        # (clock, machine busy, own busy) where the current stretch of stepping began;
        # None while the engine is idle
        self._since: tuple[float, float, float] | None = self._snapshot()
        self._stepped_s = self._others_s = 0.0   # this sample so far: stepping time, others' CPU
        self._proposal, self._votes = max_threads, 0

    def _snapshot(self) -> tuple[float, float, float]:
        return self._clock(), self._machine_busy(), self._own_busy()

    def _close_stretch(self) -> None:
        """Add the stretch of stepping since `_since` to the sample being gathered."""
        then, machine_then, own_then = self._since
        now, machine, own = self._since = self._snapshot()
        self._stepped_s += now - then
        self._others_s += max(0.0, (machine - machine_then) - (own - own_then))

    def target(self, others_cpus: float) -> int:
        """Threads for the cores left free (rounded to nearest, at least 1)."""
        free = self.max_threads - others_cpus
        return max(1, min(self.max_threads, math.floor(free + 0.5)))

    def pause(self) -> None:
        """Call when the engine goes idle: what others run until the next tick is not counted."""
        if self._since is not None:
            self._close_stretch()
            self._since = None

    def tick(self) -> int | None:
        """Call before each step; returns the new thread count when it changed, else None."""
        if self._since is None:                      # back from idle: a new stretch begins
            self._since = self._snapshot()
            return None
        if self._stepped_s + self._clock() - self._since[0] < self._interval_s:
            return None
        self._close_stretch()
        self.others_cpus = self._others_s / max(self._stepped_s, 1e-9)
        self._stepped_s = self._others_s = 0.0
        if self._cpu_budget is not None:
            self.budget_cpus = max(1, min(self.max_threads, self._cpu_budget()))
        return self._vote(min(self.target(self.others_cpus), self.budget_cpus))

    def _vote(self, proposal: int) -> int | None:
        if proposal == self.threads:
            self._votes = 0
            return None
        self._votes = self._votes + 1 if proposal == self._proposal else 1
        self._proposal = proposal
        if self._votes < self._confirm:
            return None
        log.info("CPU threads %d -> %d (other processes keep %.2f of %d CPUs busy; %d usable now)",
                 self.threads, proposal, self.others_cpus, self.max_threads, self.budget_cpus)
        self.threads, self._votes = proposal, 0
        self._set_threads(proposal)
        return proposal


def start_cpu_threads(requested: int | None, adaptive: bool) -> ThreadGovernor | None:
    """Set torch's (and so the C kernels') OpenMP team size on the calling thread, the one that
    runs the engine's steps, and return the governor to tick between steps (None: fixed size).

    The size is `requested` (--cpu-threads), else OMP_NUM_THREADS, else the CPU budget.
    """
    import torch   # here, not at import: the policy above is plain Python and tested without it

    budget = usable_cpus()
    from_env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if requested is not None:
        threads, why = requested, "--cpu-threads"
    elif from_env.isdigit() and int(from_env) > 0:
        threads, why = int(from_env), "OMP_NUM_THREADS"
    else:
        threads, why = budget.cpus, budget.source
    torch.set_num_threads(threads)
    governor = (ThreadGovernor(threads, torch.set_num_threads,
                               cpu_budget=lambda: usable_cpus().cpus)
                if adaptive and threads > 1 else None)
    log.info("CPU threads: %d (%s; %d CPUs usable here); %s", threads, why, budget.cpus,
             "fewer while other processes keep cores busy (--no-adaptive-threads: fixed)"
             if governor else "fixed")
    return governor
