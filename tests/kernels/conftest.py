"""Fixtures for kernel tests: Triton kernels on CPU under TRITON_INTERPRET=1, or compiled on CUDA.

Triton picks interpreter-vs-compiler when `@triton.jit` runs, i.e. at import, and that includes
Triton's own helpers (`tl.zeros`, `tl.sum`, ...). So on a machine without CUDA (or with
TRITON_INTERPRET=1 already set) this file imports `triton.language` and a private copy of the
`kernels/triton` package with TRITON_INTERPRET=1, before any test imports them; the variable is
then scoped to the CPU tests by the `device` fixture so it does not leak into the rest of the suite.

One process can hold only one mode. If another test module imported Triton first (transformers does,
for instance), the in-process CPU tests skip and `test_subprocess_checks.py` reruns them in a
fresh interpreter-mode process. On a CUDA machine the tests run the compiled kernels on the GPU;
`TRITON_INTERPRET=1 pytest tests/kernels` runs the interpreter there too.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch

from kernels.triton.launch import interpret_mode

KERNEL_FUNCTIONS = {
    "rmsnorm": "rms_norm",
    "rope": "apply_rope",
    "silu_mul": "silu_and_mul",
    "store_kv": "store_kv",
    "prefill_attention": "prefill_attention",
    "decode_attention": "decode_attention",
}
REPO_ROOT = Path(__file__).resolve().parents[2]
TRITON_DIR = REPO_ROOT / "kernels" / "triton"
INTERPRET = interpret_mode() or not torch.cuda.is_available()
DEVICES = ["cpu"] if INTERPRET else ["cuda"]


@contextmanager
def triton_interpret_env(enabled: bool) -> Iterator[None]:
    """Set (or unset) TRITON_INTERPRET for the duration of the block, then restore it."""
    previous = os.environ.get("TRITON_INTERPRET")
    if enabled:
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


def load_kernel_modules(package: str) -> dict[str, ModuleType]:
    """Import a private copy of the kernels/triton package as `package` (its modules import
    their siblings relatively, so the copy is whole; normal `kernels.triton.*` stay untouched)."""
    spec = importlib.util.spec_from_file_location(package, TRITON_DIR / "__init__.py",
                                                  submodule_search_locations=[str(TRITON_DIR)])
    sys.modules[package] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules[package])
    return {name: importlib.import_module(f"{package}.{name}") for name in KERNEL_FUNCTIONS}


def _wrappers(modules: dict[str, ModuleType]) -> SimpleNamespace:
    return SimpleNamespace(**{fn: getattr(modules[mod], fn) for mod, fn in KERNEL_FUNCTIONS.items()})


def _triton_is_interpreted() -> bool:
    """True when triton.language's own @jit helpers were built for the interpreter."""
    import triton.language as tl

    return type(tl.zeros).__name__ == "InterpretedFunction"


INTERPRETED_OPS: SimpleNamespace | None = None
if INTERPRET:
    with triton_interpret_env(True):
        if _triton_is_interpreted():
            INTERPRETED_OPS = _wrappers(load_kernel_modules("_interpreted_kernels"))
IN_PROCESS_INTERPRETER = INTERPRETED_OPS is not None


def _compiled_ops() -> SimpleNamespace:
    return _wrappers({name: importlib.import_module(f"kernels.triton.{name}") for name in KERNEL_FUNCTIONS})


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> torch.device:
    """cpu (Triton interpreter) on machines without CUDA, else cuda (compiled kernels)."""
    if request.param == "cpu":
        if not IN_PROCESS_INTERPRETER:
            pytest.skip("Triton was imported in compiled mode before this conftest; "
                        "test_subprocess_checks.py reruns these in a fresh process")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return torch.device(request.param)


@pytest.fixture
def tops(device: torch.device) -> SimpleNamespace:
    """The Triton wrappers that fit `device`: interpreted copies on CPU, compiled modules on CUDA."""
    return INTERPRETED_OPS if device.type == "cpu" else _compiled_ops()


@pytest.fixture
def checked_ops() -> SimpleNamespace:
    """Triton wrappers for argument-check tests (they raise before any launch)."""
    if INTERPRETED_OPS is not None:
        return INTERPRETED_OPS
    if INTERPRET:
        pytest.skip("Triton was imported in compiled mode; test_subprocess_checks.py covers this")
    return _compiled_ops()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(1234)
