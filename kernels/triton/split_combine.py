"""Merge split-K partial attention outputs (Triton): stage 2 of decode and of split prefill.

Stage 1 (decode_attention.py, prefill_attention.py) cut each query row's keys into `num_splits`
slices and wrote, per slice, the normalised partial output and its log2-sum-exp2 (-inf for a
slice that saw no key). One program per (row, query head) weights the partials by exp2(lse).
`num_splits` is a runtime argument (never specialized): one compiled variant serves every split
count up to MAX_SPLITS.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .launch import interpret_mode

MAX_SPLITS = 32  # the most slices a row's keys are cut into (BLOCK_S of the merge)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_combine_kernel(
    partial_out_ptr,  # *f32 [rows, q_heads, num_splits, HEAD_DIM]
    partial_lse_ptr,  # *f32 [rows, q_heads, num_splits]; -inf marks an empty split
    out_ptr,  # *T [rows, q_heads, HEAD_DIM]
    out_row_stride,  # elements between rows of out
    out_head_stride,  # elements between heads of out
    num_splits,  # slices per row (runtime: 1..BLOCK_S)
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,  # MAX_SPLITS, a power of two
):
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    q_heads = tl.num_programs(1)
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, HEAD_DIM)
    base = (row * q_heads + head) * num_splits
    lse = tl.load(partial_lse_ptr + base + splits, mask=splits < num_splits, other=float("-inf"))
    valid = lse > float("-inf")  # [BLOCK_S]
    lse_max = tl.max(tl.where(valid, lse, -1e30), axis=0)
    weights = tl.where(valid, tl.exp2(lse - lse_max), 0.0)  # [BLOCK_S]
    partial_ptrs = partial_out_ptr + (base + splits[:, None]) * HEAD_DIM + dims[None, :]
    partials = tl.load(partial_ptrs, mask=valid[:, None], other=0.0)  # [BLOCK_S, HEAD_DIM]
    total = tl.sum(weights, axis=0)
    out = tl.sum(partials * weights[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    out_ptrs = out_ptr + row * out_row_stride + head * out_head_stride + dims
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty))


def combine_splits(partial_out: Tensor, partial_lse: Tensor, out: Tensor) -> None:
    """out[r, h] = the exp2(lse)-weighted mean of partial_out[r, h, :num_splits] (in place)."""
    rows, q_heads, num_splits, head_dim = partial_out.shape
    if rows == 0:
        return
    if num_splits > MAX_SPLITS:
        raise ValueError(f"num_splits must be <= {MAX_SPLITS}, got {num_splits}")
    _decode_combine_kernel[(rows, q_heads)](
        partial_out, partial_lse, out,
        out.stride(0), out.stride(1),
        num_splits,
        HEAD_DIM=head_dim,
        BLOCK_S=MAX_SPLITS,
        num_warps=1 if interpret_mode() else 4,
    )
