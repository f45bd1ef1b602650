"""Split-K flash-decoding through the request->token table (Triton). Twin of kernels.reference.decode_attention.

Stage 1: one program per (request, kv head, split) handles all query heads of that kv head (GQA) over
one slice of the request's tokens and writes a normalised partial output plus its log-sum-exp.
Stage 2 (split_combine.py): one program per (request, query head) merges the splits' partials
weighted by exp(lse). The split count is a runtime argument of both: one compiled variant per
dtype and head size serves every batch and length (no compile while serving).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _checks
from .launch import (LOG2_E, dot_in_fp32, dot_precision, index_pointer_options, interpret_mode,
                     target_programs)
from .online_softmax import attend_block
from .split_combine import MAX_SPLITS, combine_splits

MIN_SPLIT_TOKENS = 128  # do not cut a request into slices shorter than this


@triton.jit(do_not_specialize=["num_splits"], **index_pointer_options("slots_ptr", "seq_lens_ptr"))
def _decode_split_kernel(
    q_ptr,  # *T [batch, q_heads, HEAD_DIM]: one query per request
    k_cache_ptr,  # *T [capacity, kv_heads, HEAD_DIM]: K pool
    v_cache_ptr,  # *T [capacity, kv_heads, HEAD_DIM]: V pool
    req_to_token_ptr,  # *i32 [max_requests, max_model_len]: pool row of token j of request r
    slots_ptr,  # *i32 [batch]: req_to_token row of each request
    seq_lens_ptr,  # *i32 [batch]: tokens to attend to per request
    partial_out_ptr,  # *f32 [batch, q_heads, num_splits, HEAD_DIM]: normalised partial outputs
    partial_lse_ptr,  # *f32 [batch, q_heads, num_splits]: log2-sum-exp2 of each split's scores
    q_batch_stride,  # elements between requests of q
    q_head_stride,  # elements between heads of q
    k_row_stride,  # elements between pool rows of k_cache
    k_head_stride,  # elements between heads of k_cache
    v_row_stride,  # elements between pool rows of v_cache
    v_head_stride,  # elements between heads of v_cache
    req_to_token_stride,  # elements between rows of req_to_token
    group,  # q_heads // kv_heads
    num_splits,  # slices each request's keys are cut into (runtime: never a recompile)
    qk_scale,  # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,  # power of two >= group, at least 16 (tl.dot minimum)
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs, else "tf32" (the default)
    DOT_IN_FP32: tl.constexpr,  # interpreter only: its tl.dot cannot multiply bf16, so upcast first
):
    request = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + request)
    slot = tl.load(slots_ptr + request).to(tl.int64)
    split_len = (seq_len + num_splits - 1) // num_splits  # tokens per split, rounded up
    split_start = split * split_len
    split_end = tl.minimum(split_start + split_len, seq_len)

    group_ids = tl.arange(0, BLOCK_G)
    g_mask = group_ids < group
    heads = kv_head * group + group_ids  # [BLOCK_G] query heads served by this kv head
    dims = tl.arange(0, HEAD_DIM)
    q_ptrs = q_ptr + request.to(tl.int64) * q_batch_stride + heads[:, None] * q_head_stride + dims[None, :]
    query = tl.load(q_ptrs, mask=g_mask[:, None], other=0.0)  # [BLOCK_G, HEAD_DIM]
    if DOT_IN_FP32:
        query = query.to(tl.float32)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
    r2t_row = req_to_token_ptr + slot * req_to_token_stride
    for n_start in range(split_start, split_end, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < split_end
        # every query head of the group sees every key of the split
        m_i, l_i, acc = attend_block(query, m_i, l_i, acc, r2t_row, offs_n, n_mask,
                                     n_mask[None, :], k_cache_ptr, v_cache_ptr, kv_head,
                                     k_row_stride, k_head_stride, v_row_stride, v_head_stride,
                                     qk_scale, HEAD_DIM, True, DOT_PRECISION, DOT_IN_FP32)

    has_tokens = l_i > 0  # false for an empty split (and for padded heads never stored)
    safe_l = tl.where(has_tokens, l_i, 1.0)
    partial = tl.where(has_tokens[:, None], acc / safe_l[:, None], 0.0)
    lse = tl.where(has_tokens, m_i + tl.log2(safe_l), float("-inf"))
    row_base = (request.to(tl.int64) * group * tl.num_programs(1) + heads) * num_splits + split  # [BLOCK_G]
    tl.store(partial_out_ptr + row_base[:, None] * HEAD_DIM + dims[None, :], partial, mask=g_mask[:, None])
    tl.store(partial_lse_ptr + row_base, lse, mask=g_mask)


def _pick_num_splits(batch: int, kv_heads: int, max_seq_len: int, device: torch.device) -> int:
    """Enough splits to give every SM a few programs, never slices shorter than MIN_SPLIT_TOKENS.

    num_splits is a runtime kernel argument, so any value costs no compile. It depends only on
    (batch, kv_heads, max_seq_len, device): a captured CUDA graph stays valid as long as the
    caller passes a fixed max_seq_len.
    """
    by_occupancy = triton.cdiv(target_programs(device), max(batch * kv_heads, 1))
    min_split = 16 if interpret_mode() else MIN_SPLIT_TOKENS
    by_length = triton.cdiv(max(max_seq_len, 1), min_split)
    return max(1, min(by_occupancy, by_length, MAX_SPLITS))


def _pick_block_n(head_dim: int, dtype: torch.dtype) -> tuple[int, int]:
    """(context tokens per inner step, num_warps): 16 keys in the interpreter; for fp32 (FMA dots)
    32 keys over 8 warps, which compiles spill-free for sm_90 where 4 warps spill."""
    if interpret_mode():
        return 16, 4
    if dtype == torch.float32:
        return 32, 8
    return (32, 4) if head_dim > 128 else (64, 4)


def _check(q: Tensor, k_cache: Tensor, v_cache: Tensor, req_to_token: Tensor, slots: Tensor,
           seq_lens: Tensor) -> None:
    _checks.check_queries_over_pool(q, k_cache, v_cache, req_to_token)
    for name, index in (("slots", slots), ("seq_lens", seq_lens)):
        _checks.check_index(name, index)
        _checks.check_contiguous(name, index)
        _checks.check_length(name, index, q.shape[0])
    _checks.check_same_device(q=q, k_cache=k_cache, req_to_token=req_to_token, slots=slots, seq_lens=seq_lens)


def decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    req_to_token: Tensor,
    slots: Tensor,
    seq_lens: Tensor,
    scale: float,
    max_seq_len: int,
) -> Tensor:
    """One query per request q [batch, q_heads, d] over its first seq_lens[b] pool tokens.

    max_seq_len only sizes the number of KV splits (keep it fixed for CUDA-graph capture): the kernel
    reads seq_lens on the device, so any lengths are handled correctly whatever max_seq_len says.
    """
    _check(q, k_cache, v_cache, req_to_token, slots, seq_lens)
    batch, q_heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    group = q_heads // kv_heads
    out = torch.empty((batch, q_heads, head_dim), dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    block_n, num_warps = _pick_block_n(head_dim, q.dtype)
    num_splits = _pick_num_splits(batch, kv_heads, int(max_seq_len), q.device)
    partial_out = torch.empty((batch, q_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
    partial_lse = torch.empty((batch, q_heads, num_splits), dtype=torch.float32, device=q.device)
    _decode_split_kernel[(batch, kv_heads, num_splits)](
        q, k_cache, v_cache, req_to_token, slots, seq_lens, partial_out, partial_lse,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1),
        req_to_token.stride(0),
        group,
        num_splits,
        float(scale) * LOG2_E,
        HEAD_DIM=head_dim,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_N=block_n,
        DOT_PRECISION=dot_precision(q.dtype),
        DOT_IN_FP32=dot_in_fp32(q.dtype),
        num_warps=num_warps,
        num_stages=2,
    )
    combine_splits(partial_out, partial_lse, out)
    return out
