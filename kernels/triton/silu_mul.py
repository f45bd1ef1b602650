"""SiLU-and-multiply for the gated MLP (Triton). Twin of kernels.reference.silu_and_mul."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _checks

BLOCK = 1024  # channels per program


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,  # *T [tokens, 2 * inter]: gate in the first half of a row, up in the second
    out_ptr,  # *T [tokens, inter]
    x_row_stride,  # elements between rows of x
    out_row_stride,  # elements between rows of out
    inter,  # intermediate size (half the width of x)
    BLOCK: tl.constexpr,  # channels handled by one program
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_row_stride + inter + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * out_row_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: Tensor) -> Tensor:
    """x [tokens, 2 * inter] (gate | up) -> [tokens, inter] = silu(gate) * up."""
    _checks.check_rank("x", x, 2)
    _checks.check_float("x", x)
    _checks.check_unit_last_stride("x", x)
    if x.shape[1] % 2:
        raise ValueError(f"x's last dimension must be even (gate | up), got {x.shape[1]}")
    tokens, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty((tokens, inter), dtype=x.dtype, device=x.device)
    if tokens == 0 or inter == 0:
        return out
    block = min(BLOCK, triton.next_power_of_2(inter))
    grid = (tokens, triton.cdiv(inter, block))
    _silu_and_mul_kernel[grid](x, out, x.stride(0), out.stride(0), inter, BLOCK=block, num_warps=4)
    return out
