"""Rotary position embedding applied in place to q and k (Triton). Twin of kernels.reference.apply_rope."""

from __future__ import annotations

import triton
import triton.language as tl
import torch
from torch import Tensor

from . import _checks


@triton.jit
def _rotate_heads(
    base_ptr,  # *T: first element of this token's row of heads
    head_stride,  # elements between heads
    heads,  # number of heads in the row
    cos,  # [HALF] float32
    sin,  # [HALF] float32
    HALF: tl.constexpr,  # head_dim // 2
    BLOCK_H: tl.constexpr,  # power of two >= heads
):
    head_ids = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, HALF)
    first = base_ptr + head_ids[:, None] * head_stride + dims[None, :]  # [BLOCK_H, HALF] pointers
    mask = head_ids[:, None] < heads
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    out1 = x1 * cos[None, :] - x2 * sin[None, :]
    out2 = x2 * cos[None, :] + x1 * sin[None, :]
    tl.store(first, out1.to(base_ptr.dtype.element_ty), mask=mask)
    tl.store(first + HALF, out2.to(base_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr,  # *T [tokens, q_heads, head_dim], rotated in place
    k_ptr,  # *T [tokens, kv_heads, head_dim], rotated in place
    positions_ptr,  # *int [tokens]: position of each token
    cos_sin_ptr,  # *f32 [max_positions, head_dim]: cos | sin, contiguous
    q_token_stride,  # elements between tokens of q
    q_head_stride,  # elements between heads of q
    k_token_stride,  # elements between tokens of k
    k_head_stride,  # elements between heads of k
    q_heads,  # number of query heads
    kv_heads,  # number of key heads
    HALF: tl.constexpr,  # head_dim // 2
    BLOCK_QH: tl.constexpr,  # power of two >= q_heads
    BLOCK_KH: tl.constexpr,  # power of two >= kv_heads
):
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    dims = tl.arange(0, HALF)
    cos = tl.load(cos_sin_ptr + position * (2 * HALF) + dims)
    sin = tl.load(cos_sin_ptr + position * (2 * HALF) + HALF + dims)
    _rotate_heads(q_ptr + token * q_token_stride, q_head_stride, q_heads, cos, sin, HALF, BLOCK_QH)
    _rotate_heads(k_ptr + token * k_token_stride, k_head_stride, kv_heads, cos, sin, HALF, BLOCK_KH)


def _check(q: Tensor, k: Tensor, positions: Tensor, cos_sin: Tensor) -> None:
    _checks.check_rank("q", q, 3)
    _checks.check_rank("k", k, 3)
    _checks.check_float("q", q)
    _checks.check_float("k", k)
    _checks.check_unit_last_stride("q", q)
    _checks.check_unit_last_stride("k", k)
    _checks.check_index("positions", positions)
    _checks.check_length("k", k, q.shape[0])
    _checks.check_length("positions", positions, q.shape[0])
    head_dim = q.shape[2]
    _checks.check_head_dim(head_dim)
    if k.shape[2] != head_dim:
        raise ValueError(f"k head_dim must equal q head_dim ({head_dim}), got {k.shape[2]}")
    _checks.check_rank("cos_sin", cos_sin, 2)
    if cos_sin.dtype != torch.float32 or cos_sin.shape[1] != head_dim:
        raise ValueError(
            f"cos_sin must be float32 [max_positions, {head_dim}], got {cos_sin.dtype} {tuple(cos_sin.shape)}"
        )
    _checks.check_contiguous("cos_sin", cos_sin)
    _checks.check_same_device(q=q, k=k, positions=positions, cos_sin=cos_sin)


def apply_rope(q: Tensor, k: Tensor, positions: Tensor, cos_sin: Tensor) -> None:
    """Rotate q [tokens, q_heads, head_dim] and k [tokens, kv_heads, head_dim] in place by position.

    Positions must lie in [0, cos_sin.shape[0]); they are not range-checked (that would sync the device).
    """
    _check(q, k, positions, cos_sin)
    tokens, q_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    if tokens == 0:
        return
    _rope_kernel[(tokens,)](
        q,
        k,
        positions,
        cos_sin,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        q_heads,
        kv_heads,
        HALF=head_dim // 2,
        BLOCK_QH=max(2, triton.next_power_of_2(q_heads)),
        BLOCK_KH=max(2, triton.next_power_of_2(kv_heads)),
        num_warps=4,
    )
