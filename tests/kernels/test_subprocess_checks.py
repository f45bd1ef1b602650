"""Checks that need a fresh process: sm_90 compilation, and the interpreter when Triton came in compiled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

from tests.kernels.conftest import IN_PROCESS_INTERPRETER, INTERPRET, REPO_ROOT

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
INTERPRETER_TEST_FILES = ["tests/kernels/test_triton_elementwise.py", "tests/kernels/test_triton_attention.py",
                          "tests/kernels/test_backend.py", "tests/kernels/test_triton_quant_gemm.py"]


def _run(args: list[str], interpret: bool) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=540)


@pytest.mark.skipif(not PTXAS.exists(), reason="Triton wheel without the NVIDIA backend (no ptxas)")
def test_kernels_compile_for_sm90(tmp_path: Path) -> None:
    """The variants the JIT really compiles (its 16-byte hints included) fit sm_90 without spills,
    and the attention kernels' loads are pipelined (cp.async), which the hint-less variant lacked."""
    report_path = tmp_path / "aot.json"
    result = _run(["-m", "tests.kernels.aot_compile", "--json", str(report_path)], interpret=False)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    reports = json.loads(report_path.read_text())
    for kernel in ("_rms_norm_kernel", "_rope_kernel", "_silu_and_mul_kernel", "_store_kv_kernel",
                   "_prefill_attention_kernel", "_decode_split_kernel", "_decode_combine_kernel"):
        assert any(r["kernel"] == kernel for r in reports), f"{kernel} was not compiled"
    for report in reports:
        assert report["local_bytes"] == 0 and report["stack_bytes"] == 0, report
        assert report["registers"] <= 255, report
    attention = [r for r in reports if r["kernel"] in ("_prefill_attention_kernel", "_decode_split_kernel")]
    assert len(attention) == 8  # one variant per kernel per (shape, dtype): no alignment twins
    for report in attention:
        assert {"q_ptr", "k_cache_ptr", "v_cache_ptr", "k_row_stride"} <= set(report["divisible_args"]), report
        assert report["cp_async"], report


@pytest.mark.skipif(not INTERPRET or IN_PROCESS_INTERPRETER,
                    reason="the interpreter tests already run in this process")
def test_interpreter_tests_in_fresh_process() -> None:
    """Triton was imported in compiled mode before tests/kernels; rerun the CPU kernel tests cleanly."""
    result = _run(["-m", "pytest", "-q", "-p", "no:cacheprovider", *INTERPRETER_TEST_FILES], interpret=True)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout.splitlines()[-1], result.stdout[-2000:]


@pytest.mark.skipif(not INTERPRET or not IN_PROCESS_INTERPRETER,
                    reason="test_interpreter_tests_in_fresh_process reruns the whole file")
def test_triton_quantized_backend_in_fresh_process() -> None:
    """The Triton backend on a quantized model needs a process started interpreted (it imports
    the kernels afresh); the in-process run skips it, so run it here."""
    result = _run(["-m", "pytest", "-q", "-p", "no:cacheprovider",
                   "tests/kernels/test_triton_quant_gemm.py", "-k", "backend_runs"], interpret=True)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "1 passed" in result.stdout.splitlines()[-1], result.stdout[-2000:]


def test_bench_smoke_run_in_interpreter(tmp_path: Path) -> None:
    out = tmp_path / "kernels.json"
    result = _run(["bench/kernels.py", "--interpret", "--json", str(out)], interpret=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert payload["versions"]["triton"] == triton.__version__
    kernels = {(row["kernel"], row["impl"]) for row in payload["results"]}
    for name in ("rms_norm+residual", "apply_rope", "silu_and_mul", "store_kv", "prefill_attn", "decode_attn",
                 "w8a16 qkv m1", "w4a16 gate_up m16"):
        assert {(name, "triton"), (name, "torch")} <= kernels
    diffs = [row["max_abs_diff"] for row in payload["results"] if row["impl"] == "triton"]
    assert all(diff is not None and diff < 0.2 for diff in diffs), diffs  # bf16 through the interpreter
