"""The CPU budget (affinity, cgroup quota) and the thread governor, on fake /proc readings."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine_svc.cpu_threads import ThreadGovernor, cgroup_quota, machine_busy_seconds, usable_cpus


def fake_cgroups(tmp_path: Path, v2: str = "/", v1: str = "/") -> Path:
    """A /proc/self/cgroup naming the given paths; returns its file."""
    proc = tmp_path / "proc_cgroup"
    proc.write_text(f"4:memory:/elsewhere\n1:cpu,cpuacct:{v1}\n0::{v2}\n")
    return proc


def test_cgroup_v2_quota_and_unlimited(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    (root / "pod" / "engine").mkdir(parents=True)
    proc = fake_cgroups(tmp_path, v2="/pod/engine")
    assert cgroup_quota(root, proc) is None
    (root / "pod" / "engine" / "cpu.max").write_text("max 100000\n")
    assert cgroup_quota(root, proc) is None
    (root / "pod" / "cpu.max").write_text("150000 100000\n")    # a parent's limit counts too
    assert cgroup_quota(root, proc) == pytest.approx(1.5)
    (root / "pod" / "engine" / "cpu.max").write_text("50000 100000\n")
    assert cgroup_quota(root, proc) == pytest.approx(0.5)       # the tightest one


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    group = tmp_path / "cg" / "cpu" / "bench"
    group.mkdir(parents=True)
    proc = fake_cgroups(tmp_path, v1="/bench")
    (group / "cpu.cfs_quota_us").write_text("50000\n")
    (group / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_quota(tmp_path / "cg", proc) == pytest.approx(0.5)
    (group / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_quota(tmp_path / "cg", proc) is None


def test_usable_cpus_takes_the_smaller_of_affinity_and_quota(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    proc = fake_cgroups(tmp_path)
    assert usable_cpus(tmp_path, proc).cpus == affinity       # no cgroup files: affinity
    (tmp_path / "cpu.max").write_text("100000 100000\n")        # one CPU of quota
    budget = usable_cpus(tmp_path, proc)
    assert budget.cpus == 1 and budget.quota == pytest.approx(1.0)
    if affinity > 1:
        assert "quota" in budget.source
    (tmp_path / "cpu.max").write_text("10000 100000\n")         # 0.1 CPU still gets 1 thread
    assert usable_cpus(tmp_path, proc).cpus == 1
    (tmp_path / "cpu.max").write_text(f"{(affinity + 4) * 100000} 100000\n")
    assert usable_cpus(tmp_path, proc).cpus == affinity       # a quota above the mask: the mask
    assert usable_cpus().cpus >= 1                             # this machine's real files


def test_machine_busy_reads_proc_stat_shape(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text("cpu  100 10 50 9999 77 5 5 30 0 0\ncpu0 1 2 3\n")
    ticks = os.sysconf("SC_CLK_TCK")
    assert machine_busy_seconds(stat) == pytest.approx((100 + 10 + 50 + 5 + 5 + 30) / ticks)
    assert machine_busy_seconds() > 0  # the real file parses


class FakeMachine:
    """Machine and own busy seconds that advance as the test says, with a manual clock."""

    def __init__(self) -> None:
        self.now = self.machine = self.own = 0.0

    def advance(self, seconds: float, own_cpus: float, other_cpus: float) -> None:
        self.now += seconds
        self.own += own_cpus * seconds
        self.machine += (own_cpus + other_cpus) * seconds


def governor(max_threads: int = 2) -> tuple[ThreadGovernor, FakeMachine, list[int]]:
    fake, calls = FakeMachine(), []
    gov = ThreadGovernor(max_threads, calls.append, interval_s=0.5, confirm=2,
                         machine_busy=lambda: fake.machine, own_busy=lambda: fake.own,
                         clock=lambda: fake.now)
    return gov, fake, calls


def test_quiet_machine_keeps_every_thread() -> None:
    gov, fake, calls = governor()
    for _ in range(10):
        fake.advance(0.5, own_cpus=2.0, other_cpus=0.05)
        assert gov.tick() is None
    assert calls == [] and gov.threads == 2


def test_a_busy_neighbour_drops_a_thread_after_two_samples_and_it_comes_back() -> None:
    gov, fake, calls = governor()
    fake.advance(0.5, own_cpus=1.4, other_cpus=0.6)   # a hog takes its share of our 2 cores
    assert gov.tick() is None                          # one sample is not enough
    fake.advance(0.5, own_cpus=1.4, other_cpus=0.6)
    assert gov.tick() == 1 and calls == [1]
    for _ in range(4):                                 # hog has its own core now: stay at 1
        fake.advance(0.5, own_cpus=1.0, other_cpus=1.0)
        assert gov.tick() is None
    fake.advance(0.5, own_cpus=1.0, other_cpus=0.0)    # the hog is gone
    assert gov.tick() is None
    fake.advance(0.5, own_cpus=1.0, other_cpus=0.0)
    assert gov.tick() == 2 and calls == [1, 2]


def test_light_neighbours_such_as_the_tokenizer_service_do_not_cost_a_thread() -> None:
    gov, fake, calls = governor()
    for _ in range(10):
        fake.advance(0.5, own_cpus=1.7, other_cpus=0.35)
        gov.tick()
    assert calls == []


def test_never_below_one_thread_and_samples_wait_for_the_interval() -> None:
    gov, fake, calls = governor(max_threads=4)
    fake.advance(0.2, own_cpus=1.0, other_cpus=4.0)
    assert gov.tick() is None                          # before the interval: no sample
    for _ in range(2):
        fake.advance(0.5, own_cpus=1.0, other_cpus=6.0)
        gov.tick()
    assert calls == [1]
    assert [gov.target(x) for x in (0.0, 0.4, 0.6, 1.6, 2.4, 3.6)] == [4, 4, 3, 2, 2, 1]


def test_flapping_samples_do_not_change_threads() -> None:
    gov, fake, calls = governor()
    for others in (0.9, 0.1, 0.9, 0.1, 0.9, 0.1):
        fake.advance(0.5, own_cpus=1.5, other_cpus=others)
        gov.tick()
    assert calls == []


def test_load_while_the_engine_idles_is_not_contention() -> None:
    # bursts of stepping on a quiet machine; between them the engine waits and a neighbour runs
    # both cores (a benchmark's other half): before, each burst's first sample spanned the wait
    # and read as 2 busy CPUs, which dropped the engine to one thread and kept it there
    gov, fake, calls = governor()
    for _ in range(12):
        gov.tick()
        for _ in range(3):                             # 0.3 s of steps, nobody else running
            fake.advance(0.1, own_cpus=2.0, other_cpus=0.0)
            gov.tick()
        gov.pause()                                    # the engine waits for requests
        fake.advance(1.0, own_cpus=0.0, other_cpus=2.0)
    assert calls == [] and gov.threads == 2


def test_short_bursts_under_a_hog_add_up_to_samples() -> None:
    # the same short bursts, but a hog shares the cores while the engine steps: the stretches
    # of stepping add up to full samples and the engine still gives the hog its core
    gov, fake, calls = governor()
    for _ in range(6):
        gov.tick()
        for _ in range(3):
            fake.advance(0.1, own_cpus=1.2, other_cpus=0.8)
            gov.tick()
        gov.pause()
        fake.advance(1.0, own_cpus=0.0, other_cpus=1.0)
    assert calls == [1] and gov.threads == 1
    assert gov.others_cpus == pytest.approx(0.8)


def test_a_quota_changed_after_start_resizes_the_team() -> None:
    fake, calls, budget = FakeMachine(), [], [2]
    gov = ThreadGovernor(2, calls.append, interval_s=0.5, confirm=2,
                         machine_busy=lambda: fake.machine, own_busy=lambda: fake.own,
                         clock=lambda: fake.now, cpu_budget=lambda: budget[0])
    fake.advance(0.5, own_cpus=1.0, other_cpus=0.0)
    assert gov.tick() is None
    budget[0] = 1                                      # a 1-CPU quota set on the running engine
    for _ in range(2):
        fake.advance(0.5, own_cpus=1.0, other_cpus=0.0)   # nobody else busy: only the quota
        gov.tick()
    assert calls == [1] and gov.budget_cpus == 1
    budget[0] = 8                                      # raised past the start size: back to 2
    for _ in range(2):
        fake.advance(0.5, own_cpus=1.0, other_cpus=0.0)
        gov.tick()
    assert calls == [1, 2] and gov.threads == 2


def test_rejects_no_threads() -> None:
    with pytest.raises(ValueError, match="max_threads"):
        ThreadGovernor(0, lambda n: None)


def test_start_cpu_threads_sizes_torch_and_governs_only_when_asked(monkeypatch) -> None:
    import torch

    from engine_svc.cpu_threads import start_cpu_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert start_cpu_threads(None, adaptive=True) is None     # one thread: nothing to govern
        assert torch.get_num_threads() == 1
        governor = start_cpu_threads(2, adaptive=True)            # the flag wins over the env
        assert torch.get_num_threads() == 2 and governor is not None
        assert governor.max_threads == 2
        assert start_cpu_threads(2, adaptive=False) is None
        monkeypatch.delenv("OMP_NUM_THREADS")
        start_cpu_threads(None, adaptive=False)
        assert torch.get_num_threads() == usable_cpus().cpus
    finally:
        torch.set_num_threads(before)


def test_engine_cli_refuses_zero_threads_before_loading(tmp_path: Path, capsys) -> None:
    from engine_svc.__main__ import main

    (tmp_path / "config.json").write_text("{}")   # passes the model check; never loaded
    assert main(["--model", str(tmp_path), "--cpu-threads", "0"]) == 2
    assert "--cpu-threads must be >= 1, got 0" in capsys.readouterr().err
