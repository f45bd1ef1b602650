"""RMSNorm with a fused residual add (Triton). Twin of kernels.reference.rms_norm."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _checks


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # *T [tokens, hidden]: input rows
    residual_ptr,  # *T [tokens, hidden]: residual rows to add first (unused unless HAS_RESIDUAL)
    weight_ptr,  # *W [hidden]: per-channel scale, contiguous
    out_ptr,  # *T [tokens, hidden]: normed * weight
    residual_out_ptr,  # *T [tokens, hidden]: x + residual (unused unless HAS_RESIDUAL)
    x_row_stride,  # elements between rows of x
    residual_row_stride,  # elements between rows of residual
    out_row_stride,  # elements between rows of out
    residual_out_row_stride,  # elements between rows of residual_out
    hidden,  # number of channels per row
    eps,  # added to the mean square
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,  # power of two >= hidden
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * residual_row_stride + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x.dtype)  # the add rounds to x's dtype
        tl.store(residual_out_ptr + row * residual_out_row_stride + cols, x, mask=mask)
    x_f32 = x.to(tl.float32)
    mean_square = tl.sum(x_f32 * x_f32, axis=0) / hidden
    normed = (x_f32 * tl.rsqrt(mean_square + eps)).to(x.dtype)  # HF rounds before the weight
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    out = normed.to(tl.float32) * weight.to(tl.float32)
    tl.store(out_ptr + row * out_row_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _check(x: Tensor, weight: Tensor, residual: Tensor | None) -> None:
    _checks.check_rank("x", x, 2)
    _checks.check_float("x", x)
    _checks.check_unit_last_stride("x", x)
    _checks.check_rank("weight", weight, 1)
    _checks.check_float("weight", weight)
    _checks.check_contiguous("weight", weight)
    _checks.check_length("weight", weight, x.shape[1])
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(
                f"residual must match x ({tuple(x.shape)}, {x.dtype}), "
                f"got {tuple(residual.shape)}, {residual.dtype}"
            )
        _checks.check_unit_last_stride("residual", residual)
        _checks.check_same_device(x=x, weight=weight, residual=residual)
    else:
        _checks.check_same_device(x=x, weight=weight)


def rms_norm(
    x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """x [tokens, hidden] (+ residual) -> (normed * weight, the summed x as next residual)."""
    _check(x, weight, residual)
    tokens, hidden = x.shape
    out = torch.empty((tokens, hidden), dtype=x.dtype, device=x.device)
    has_residual = residual is not None
    residual_out = torch.empty_like(out) if has_residual else x
    if tokens == 0:
        return out, residual_out
    residual_in = residual if has_residual else x
    block = triton.next_power_of_2(hidden)
    num_warps = min(max(block // 256, 1), 16)
    _rms_norm_kernel[(tokens,)](
        x,
        residual_in,
        weight,
        out,
        residual_out,
        x.stride(0),
        residual_in.stride(0),
        out.stride(0),
        residual_out.stride(0),
        hidden,
        float(eps),
        HAS_RESIDUAL=has_residual,
        BLOCK=block,
        num_warps=num_warps,
    )
    return out, residual_out
