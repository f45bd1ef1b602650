"""Scatter new K/V rows into the token-level KV pool (Triton). Twin of kernels.reference.store_kv."""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from . import _checks


@triton.jit
def _store_kv_kernel(
    k_cache_ptr,  # *C [capacity, kv_heads, head_dim]: K pool
    v_cache_ptr,  # *C [capacity, kv_heads, head_dim]: V pool
    k_ptr,  # *T [tokens, kv_heads, head_dim]: new keys
    v_ptr,  # *T [tokens, kv_heads, head_dim]: new values
    rows_ptr,  # *int [tokens]: pool row of each new token
    k_cache_row_stride,  # elements between pool rows of k_cache
    k_cache_head_stride,  # elements between heads of k_cache
    v_cache_row_stride,  # elements between pool rows of v_cache
    v_cache_head_stride,  # elements between heads of v_cache
    k_token_stride,  # elements between tokens of k
    k_head_stride,  # elements between heads of k
    v_token_stride,  # elements between tokens of v
    v_head_stride,  # elements between heads of v
    kv_heads,  # number of KV heads
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,  # power of two >= kv_heads
):
    token = tl.program_id(0).to(tl.int64)
    row = tl.load(rows_ptr + token).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)[:, None]  # [BLOCK_H, 1]
    dims = tl.arange(0, HEAD_DIM)[None, :]  # [1, HEAD_DIM]
    mask = heads < kv_heads
    key = tl.load(k_ptr + token * k_token_stride + heads * k_head_stride + dims, mask=mask)
    value = tl.load(v_ptr + token * v_token_stride + heads * v_head_stride + dims, mask=mask)
    k_dst = k_cache_ptr + row * k_cache_row_stride + heads * k_cache_head_stride + dims
    v_dst = v_cache_ptr + row * v_cache_row_stride + heads * v_cache_head_stride + dims
    tl.store(k_dst, key.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst, value.to(v_cache_ptr.dtype.element_ty), mask=mask)


def _check(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, rows: Tensor) -> None:
    _checks.check_kv_pool(k_cache, v_cache)
    for name, new in (("k", k), ("v", v)):
        _checks.check_rank(name, new, 3)
        _checks.check_float(name, new)
        _checks.check_unit_last_stride(name, new)
        if new.shape[1:] != k_cache.shape[1:]:
            raise ValueError(
                f"{name} must be [tokens, {k_cache.shape[1]}, {k_cache.shape[2]}] like the pool, "
                f"got {tuple(new.shape)}"
            )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    _checks.check_index("rows", rows)
    _checks.check_length("rows", rows, k.shape[0])
    _checks.check_same_device(k_cache=k_cache, v_cache=v_cache, k=k, v=v, rows=rows)


def store_kv(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, rows: Tensor) -> None:
    """k_cache[rows] = k and v_cache[rows] = v; rows [tokens] must be in range (not checked on device)."""
    _check(k_cache, v_cache, k, v, rows)
    tokens, kv_heads, head_dim = k.shape
    if tokens == 0:
        return
    _store_kv_kernel[(tokens,)](
        k_cache,
        v_cache,
        k,
        v,
        rows,
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=max(2, triton.next_power_of_2(kv_heads)),
        num_warps=4,
    )
