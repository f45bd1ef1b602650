"""Backend selection and the wrappers' argument checks."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kernels import reference
from kernels.cpu import ops as cpu_ops
from kernels.backend import get_ops, resolve_backend

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def forget_new_kernel_modules() -> Iterator[None]:
    """Drop kernel modules a test imported, so the rest of the suite imports them afresh."""
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("kernels."):
            del sys.modules[name]


def test_resolve_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("cuda")) == "triton"
    assert resolve_backend("torch", torch.device("cpu")) == "torch"
    assert resolve_backend("triton", torch.device("cuda", 0)) == "triton"
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        resolve_backend("triton", torch.device("cpu"))
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("cuda", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", torch.device("cpu")) == "triton"


def test_get_ops_torch_is_the_cpu_path() -> None:
    ops = get_ops("torch")
    assert ops.backend == "torch"
    assert ops.rms_norm is cpu_ops.rms_norm
    assert ops.decode_attention is cpu_ops.decode_attention
    assert ops.prefill_attention is cpu_ops.prefill_attention
    with pytest.raises(ValueError, match="auto"):
        get_ops("auto")


def test_get_ops_triton_wraps_the_kernels(forget_new_kernel_modules: None) -> None:
    ops = get_ops("triton")
    assert ops.backend == "triton"
    assert ops.build_rope_cache is reference.build_rope_cache
    for name in ("rms_norm", "apply_rope", "silu_and_mul", "store_kv", "prefill_attention", "decode_attention"):
        function = getattr(ops, name)
        assert function.__name__ == name and function.__module__.startswith("kernels.")
        assert function is not getattr(reference, name)


def test_importing_backend_loads_no_triton() -> None:
    code = "import sys, kernels, kernels.backend, kernels.reference; sys.exit('triton' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr or "importing kernels.backend imported triton"


def _pool(head_dim: int = 64, kv_heads: int = 2, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    return torch.zeros(8, kv_heads, head_dim, dtype=dtype), torch.zeros(8, kv_heads, head_dim, dtype=dtype)


def _decode_args(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 table_dtype: torch.dtype = torch.int32) -> tuple:
    one = torch.ones(1, dtype=torch.int32)
    return (q, k_cache, v_cache, torch.zeros(2, 8, dtype=table_dtype), one - 1, one, 0.125, 1)


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda: _decode_args(torch.zeros(1, 4, 96), *_pool(96)), "head_dim"),
        (lambda: _decode_args(torch.zeros(1, 5, 64), *_pool()), "multiple of kv_heads"),
        (lambda: _decode_args(torch.zeros(1, 4, 64, dtype=torch.float16), *_pool()), "dtype"),
        (lambda: _decode_args(torch.zeros(1, 4, 64), *_pool(), torch.int64), "req_to_token"),
        (lambda: _decode_args(torch.zeros(1, 4, 64), *_pool(dtype=torch.float64)), "k_cache dtype"),
    ],
    ids=["head_dim_96", "gqa", "q_dtype", "table_dtype", "pool_dtype"],
)
def test_decode_rejects_bad_arguments(checked_ops: SimpleNamespace, make_args, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        checked_ops.decode_attention(*make_args())


def test_wrappers_reject_bad_arguments(checked_ops: SimpleNamespace) -> None:
    ops = checked_ops
    with pytest.raises(ValueError, match="weight"):
        ops.rms_norm(torch.zeros(2, 8), torch.zeros(7), 1e-6)
    with pytest.raises(ValueError, match="x dtype"):
        ops.rms_norm(torch.zeros(2, 8, dtype=torch.float64), torch.zeros(8), 1e-6)
    with pytest.raises(ValueError, match="even"):
        ops.silu_and_mul(torch.zeros(2, 7))
    with pytest.raises(ValueError, match="stride 1"):
        ops.silu_and_mul(torch.zeros(8, 2).t())
    with pytest.raises(ValueError, match="head_dim"):
        ops.apply_rope(torch.zeros(1, 2, 48), torch.zeros(1, 1, 48), torch.zeros(1, dtype=torch.long),
                       torch.zeros(4, 48))
    with pytest.raises(ValueError, match="rows"):
        ops.store_kv(*_pool(), torch.zeros(3, 2, 64), torch.zeros(3, 2, 64), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="cu_new_lens"):
        one = torch.zeros(1, dtype=torch.int32)
        ops.prefill_attention(torch.zeros(1, 4, 64), *_pool(), torch.zeros(2, 8, dtype=torch.int32), one, one,
                              one, 1, 0.125)
