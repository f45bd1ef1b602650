"""Launch settings shared by the Triton wrappers and kernels.backend (plain Python, no Triton import)."""

from __future__ import annotations

import os

import torch

LOG2_E = 1.4426950408889634  # scores are scaled by this so the kernels can use exp2


def interpret_mode() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Upcast tl.dot operands to fp32: only in the interpreter, whose dot cannot multiply bf16."""
    return interpret_mode() and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str:
    """'ieee' keeps fp32 dots exact (no TF32); fp16/bf16 use the default tensor-core path."""
    return "ieee" if dtype == torch.float32 or dot_in_fp32(dtype) else "tf32"


def target_programs(device: torch.device) -> int:
    """Programs that keep the device busy: 4 per SM on CUDA, 8 in the interpreter (so small tests
    still exercise several splits)."""
    if device.type != "cuda":
        return 8
    index = device.index if device.index is not None else torch.cuda.current_device()
    return 4 * _multiprocessor_count(index)


_SM_COUNTS: dict[int, int] = {}


def _multiprocessor_count(device_index: int) -> int:
    if device_index not in _SM_COUNTS:
        _SM_COUNTS[device_index] = torch.cuda.get_device_properties(device_index).multi_processor_count
    return _SM_COUNTS[device_index]


def index_pointer_options(*names: str) -> dict:
    """`@triton.jit` keywords that stop the JIT specializing these (index) pointers on 16-byte
    alignment, where this Triton has the option: a slice like slots[num_decode:] then never
    compiles a second variant. Empty on a Triton without it."""
    import inspect

    import triton

    if "do_not_specialize_on_alignment" in inspect.signature(triton.jit).parameters:
        return {"do_not_specialize_on_alignment": list(names)}
    return {}


def persist_triton_cache(environ: dict | None = None) -> str:
    """Keep Triton's compiled kernels across restarts: unless TRITON_CACHE_DIR is set, point it at
    $LLMSERVE_CACHE_DIR/triton or ~/.cache/llmserve/triton (mount that directory in a container).
    Call before the first compile; returns the directory used."""
    env = os.environ if environ is None else environ
    if not env.get("TRITON_CACHE_DIR"):
        root = env.get("LLMSERVE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                            "llmserve")
        env["TRITON_CACHE_DIR"] = os.path.join(root, "triton")
    os.makedirs(env["TRITON_CACHE_DIR"], exist_ok=True)
    return env["TRITON_CACHE_DIR"]
