"""bench/gpu_check.sh without a GPU: the dry run exercises every step's plumbing (arguments,
models, engines, the kernel sweep through the interpreter, JSON), and the runner stops at the
first failure or time-out with the step named in the JSON."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from bench import gpu_check
from bench.gpu_check import CheckFailed, Context, Report, Step, render_table, run_steps

REPO_ROOT = Path(__file__).resolve().parents[2]
STEPS = ["env", "model", "kernel_tests", "kernel_sweep", "quant_gemm", "compiles", "parity", "graphs",
         "sync_debug", "memory", "prefill_perf", "decode_perf", "quant_perf", "engine_8b", "torch_backend"]


def _sh(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    return subprocess.run(["bash", "bench/gpu_check.sh", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=280, env={**base, **(env or {})})


@pytest.mark.timeout(300)
def test_dry_run_runs_every_step_and_writes_one_json(tmp_path):
    done = _sh("--dry-run", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["status"] == "passed" and doc["mode"] == "dry-run" and doc["stopped_at"] is None
    assert [s["name"] for s in doc["steps"]] == STEPS
    status = {s["name"]: s["status"] for s in doc["steps"]}
    for needs_cuda in ("kernel_tests", "compiles", "sync_debug", "memory"):
        assert status.pop(needs_cuda) == "skipped"
    assert set(status.values()) == {"passed"}
    steps = {s["name"]: s for s in doc["steps"]}
    assert steps["kernel_sweep"]["result"]["cases"] == 2
    assert steps["quant_gemm"]["result"]["cases"] == 2
    assert len(steps["quant_perf"]["result"]["cases"]) == 4   # w8a16 / w4a16 x qkv / gate_up
    assert steps["parity"]["result"]["float32"] == {"equal": 5, "of": 5, "first_divergence": [None] * 5}
    assert doc["versions"]["torch"] and doc["command"].startswith("bench/gpu_check.py")
    log = (tmp_path / "gpu_check.log").read_text()
    assert "gpu_check: passed" in log and "torch_backend" in log
    assert "| status |" in render_table([tmp_path / "gpu_check.json"])


def test_without_a_gpu_the_real_run_stops_at_preflight(tmp_path):
    done = _sh("--quick", "--out", str(tmp_path), env={"PYTHON": str(REPO_ROOT / ".venv/bin/python")})
    assert done.returncode == 1
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["status"] == "failed" and doc["stopped_at"] == "preflight"


def test_unknown_step_is_a_usage_error(tmp_path):
    assert _sh("--dry-run", "--only", "env,nope", "--out", str(tmp_path)).returncode == 2


def _ctx(tmp_path: Path) -> Context:
    ctx = Context(out_dir=tmp_path, quick=False, dry_run=True, device=None, scratch=tmp_path)
    return ctx


def _fail(ctx):
    raise CheckFailed("parity 4/5")


def _slow(ctx):
    time.sleep(5)


def test_first_failure_stops_the_run_and_names_the_step(tmp_path):
    ran = []
    steps = [Step("one", lambda ctx: ran.append(1) or {"x": 1}, True, 10),
             Step("two", _fail, True, 10), Step("three", lambda ctx: ran.append(3), True, 10)]
    report = Report(tmp_path / "r.json", [], "full")
    assert run_steps(_ctx(tmp_path), steps, report, keep_going=False) == 1
    doc = json.loads((tmp_path / "r.json").read_text())
    assert ran == [1] and doc["stopped_at"] == "two" and "parity 4/5" in doc["error"]
    assert [s["status"] for s in doc["steps"]] == ["passed", "failed"]
    report = Report(tmp_path / "k.json", [], "full")
    assert run_steps(_ctx(tmp_path), steps, report, keep_going=True) == 1
    doc = json.loads((tmp_path / "k.json").read_text())
    assert ran == [1, 1, 3] and [s["status"] for s in doc["steps"]] == ["passed", "failed", "passed"]


def test_a_step_past_its_limit_times_out(tmp_path):
    report = Report(tmp_path / "t.json", [], "quick")
    started = time.perf_counter()
    assert run_steps(_ctx(tmp_path), [Step("slow", _slow, True, 1)], report, keep_going=False) == 1
    assert time.perf_counter() - started < 4
    doc = json.loads((tmp_path / "t.json").read_text())
    assert doc["status"] == "timeout" and doc["stopped_at"] == "slow"


def test_quick_skips_the_full_only_steps(tmp_path):
    ctx = _ctx(tmp_path)
    ctx.quick = True
    steps = [Step("q", lambda c: {}, True, 5), Step("full", lambda c: {}, False, 5)]
    run_steps(ctx, steps, Report(tmp_path / "q.json", [], "quick"), keep_going=False)
    assert [s["name"] for s in json.loads((tmp_path / "q.json").read_text())["steps"]] == ["q"]


def test_targets_record_value_goal_and_direction(tmp_path):
    ctx = _ctx(tmp_path)
    assert ctx.target("bw", 0.7, 0.6) and not ctx.target("syncs", 2.0, 1.0, at_most=True)
    assert ctx.targets["syncs"] == {"value": 2.0, "goal": 1.0, "relation": "<=", "unit": "", "met": False}
    assert gpu_check.parse_args(["--quick"]).quick
