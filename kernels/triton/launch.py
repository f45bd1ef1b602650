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
