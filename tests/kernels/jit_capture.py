"""What Triton's JIT would compile, recorded on a machine without a GPU.

`capture_specializations()` makes a stand-in CUDA driver (sm_90) the active Triton driver and sets
`knobs.runtime.jit_cache_hook`. Every launch of a compiled-mode `@triton.jit` kernel then runs the
JIT's own argument binding and specialization (dtypes, 16-byte divisibility of pointers and
integers, integers equal to 1 turned into constants) and computes its real cache key; on a cache
miss the JIT calls the hook before compiling, the hook records the request and returns True, and
the JIT skips the compile and the launch (outputs stay unwritten). Distinct keys per kernel are the
compiles the JIT would do; the recorded signature, constants and attributes are exactly what
`triton.compile` gets, so `tests/kernels/aot_compile.py` compiles the variants that really run.

Needs Triton in compiled mode (TRITON_INTERPRET unset before Triton is imported) and CPU tensors.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

SM90 = ("cuda", 90, 32)


class _StandInCudaDriver:
    """Just enough of a Triton driver for JITFunction.run to bind, specialize and key a launch."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget(*SM90)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


@dataclass(slots=True)
class Specialization:
    """One compile the JIT asked for: the kernel and everything `triton.compile` would get."""

    kernel: object  # the triton JITFunction
    name: str
    key: str  # the JIT's cache key (str of it), unique per compiled variant
    signature: dict
    constants: dict
    attrs: dict  # {(arg index,): [["tt.divisibility", 16]], ...}
    options: dict = field(default_factory=dict)  # num_warps, num_stages, num_ctas, ...

    def divisible_args(self) -> list[str]:
        """Names of the arguments the JIT marked as 16-byte divisible."""
        names = list(self.signature)
        return [names[path[0]] for path, values in self.attrs.items()
                if any(v[0] == "tt.divisibility" for v in values)]


@contextmanager
def capture_specializations() -> Iterator[list[Specialization]]:
    """Record (and skip) every compile the JIT would start inside the block."""
    from triton import knobs
    from triton.runtime.driver import driver

    if type(__import__("triton.language", fromlist=["zeros"]).zeros).__name__ == "InterpretedFunction":
        raise RuntimeError("Triton is in interpreter mode: unset TRITON_INTERPRET before importing it")
    recorded: list[Specialization] = []

    def hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled):  # noqa: A002
        options = {name: compile[name] for name in ("num_warps", "num_stages", "num_ctas",
                                                    "enable_fp_fusion") if name in compile}
        recorded.append(Specialization(kernel=fn.jit_function, name=fn.name, key=str(key),
                                       signature=dict(compile["signature"]),
                                       constants=dict(compile["constants"]),
                                       attrs=dict(compile["configs"][0]), options=options))
        return True  # skip compile and launch

    previous_hook = knobs.runtime.jit_cache_hook
    driver.set_active(_StandInCudaDriver())
    knobs.runtime.jit_cache_hook = hook
    try:
        yield recorded
    finally:
        knobs.runtime.jit_cache_hook = previous_hook
        driver.reset_active() if _has_default_driver(driver) else setattr(driver, "_active", None)


def _has_default_driver(driver) -> bool:
    """True when a real driver can be created (reset_active would raise without one)."""
    try:
        driver.default
    except RuntimeError:
        return False
    return True


def distinct_compiles(recorded: list[Specialization]) -> dict[str, int]:
    """Kernel name -> number of distinct cache keys (= compiles the JIT would do)."""
    keys: dict[str, set[str]] = {}
    for spec in recorded:
        keys.setdefault(spec.name, set()).add(spec.key)
    return {name: len(found) for name, found in sorted(keys.items())}
