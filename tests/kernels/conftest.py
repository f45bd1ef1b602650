"""Fixtures for kernel tests: Triton kernels on CPU under TRITON_INTERPRET=1, and on CUDA when present.

Triton decides interpreter-vs-compiler when `@triton.jit` runs, i.e. when a kernel module is imported.
So the CPU copies of the kernel modules are loaded here, with TRITON_INTERPRET=1 set before that
import (and before any kernel module is imported by these tests). The variable is then scoped to the
CPU-device tests by a fixture, so it does not leak into the rest of the suite; CUDA tests use the
normally imported (compiled) modules.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

KERNEL_FUNCTIONS = {
    "rmsnorm": "rms_norm",
    "rope": "apply_rope",
    "silu_mul": "silu_and_mul",
    "store_kv": "store_kv",
    "prefill_attention": "prefill_attention",
    "decode_attention": "decode_attention",
}
KERNELS_DIR = Path(__file__).resolve().parents[2] / "kernels"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _load_interpreted_ops() -> SimpleNamespace:
    """Import private copies of the kernel modules with TRITON_INTERPRET=1 set during the import."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        functions = {}
        for module_name, function_name in KERNEL_FUNCTIONS.items():
            qualified = f"_interpreted_kernels.{module_name}"
            spec = importlib.util.spec_from_file_location(qualified, KERNELS_DIR / f"{module_name}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[qualified] = module
            spec.loader.exec_module(module)
            functions[function_name] = getattr(module, function_name)
        return SimpleNamespace(**functions)
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


INTERPRETED_OPS = _load_interpreted_ops()


def _compiled_ops() -> SimpleNamespace:
    functions = {}
    for module_name, function_name in KERNEL_FUNCTIONS.items():
        module = importlib.import_module(f"kernels.{module_name}")
        functions[function_name] = getattr(module, function_name)
    return SimpleNamespace(**functions)


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> torch.device:
    """Each Triton test runs on CPU (interpreter) and, when present, on CUDA (compiled)."""
    if request.param == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return torch.device(request.param)


@pytest.fixture
def tops(device: torch.device) -> SimpleNamespace:
    """The Triton wrappers that fit `device`: interpreted copies on CPU, compiled modules on CUDA."""
    return INTERPRETED_OPS if device.type == "cpu" else _compiled_ops()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(1234)
