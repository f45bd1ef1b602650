"""Serving never waits for a Triton compile: a mixed workload needs one variant per kernel
(rms_norm: with and without the residual), and the engine compiles them all before its first
request. Counted through the JIT's own cache key on a stand-in sm_90 driver
(tests/kernels/jit_capture.py; the interpreter has no JIT, so no hook would fire there).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.kernels.conftest import REPO_ROOT

EXPECTED = {"_decode_combine_kernel": 1, "_decode_split_kernel": 1, "_prefill_attention_kernel": 1,
            "_rms_norm_kernel": 2, "_rope_kernel": 1, "_silu_and_mul_kernel": 1, "_store_kv_kernel": 1}


@pytest.mark.timeout(300)
def test_mixed_workload_compiles_each_kernel_once_before_serving(tmp_path, make_tiny_model) -> None:
    model_dir = make_tiny_model(tmp_path, num_heads=4, num_kv_heads=1, head_dim=64, seed=3)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(REPO_ROOT), TRITON_CACHE_DIR=str(tmp_path / "triton-cache"),
               TRITON_DEFAULT_FP_FUSION="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "tests.kernels.compile_count", str(model_dir)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    assert counts["compiles"] == EXPECTED
    assert counts["after_start"] == {}  # the start-up warm-up compiled everything serving uses


def test_triton_cache_dir_persists_across_restarts(tmp_path) -> None:
    from kernels.triton.launch import persist_triton_cache

    env = {"LLMSERVE_CACHE_DIR": str(tmp_path)}
    assert persist_triton_cache(env) == str(tmp_path / "triton") == env["TRITON_CACHE_DIR"]
    assert (tmp_path / "triton").is_dir()
    chosen = {"TRITON_CACHE_DIR": str(tmp_path / "mine")}
    assert persist_triton_cache(chosen) == str(tmp_path / "mine")  # an explicit choice stays
