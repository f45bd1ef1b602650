"""Variable-length causal GQA flash attention for prefill, reading K/V through the request->token table.

Twin of kernels.reference.prefill_attention. One program takes a block of new tokens of one request
and all query heads of one KV head (the GQA group packed into the M dimension, row = token * group +
head, as decode packs its BLOCK_G), so each K/V tile is read once per KV head, not once per query
head. It streams the request's cached prefix plus its new tokens BLOCK_N keys at a time with an
online softmax (kernels/triton/online_softmax.py): first the tiles every row sees in full (no masks),
then the tiles on the diagonal (causal mask).

Split-K: when (token blocks x requests x KV heads) is too few programs to fill the device (a short
chunk after a long cached prefix), the keys are cut into `num_splits` slices, each program writes a
normalised partial and its log-sum-exp, and split_combine.py merges them. num_splits is a runtime
argument: one compiled variant per dtype and head size serves both paths.
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

MIN_SPLIT_TOKENS = 256  # do not cut a request's keys into slices shorter than this (GPU)
PARTIAL_BYTES_CAP = 64 << 20  # fp32 partials of a split prefill stay under this


@triton.jit(do_not_specialize=["num_splits"],
            **index_pointer_options("slots_ptr", "prefix_lens_ptr", "cu_new_lens_ptr"))
def _prefill_attention_kernel(
    q_ptr,  # *T [total_new, q_heads, HEAD_DIM]: queries of the new tokens
    k_cache_ptr,  # *T [capacity, kv_heads, HEAD_DIM]: K pool (new tokens already stored)
    v_cache_ptr,  # *T [capacity, kv_heads, HEAD_DIM]: V pool
    out_ptr,  # *T [total_new, q_heads, HEAD_DIM]: attention output (num_splits == 1)
    partial_out_ptr,  # *f32 [total_new, q_heads, num_splits, HEAD_DIM]: partials (num_splits > 1)
    partial_lse_ptr,  # *f32 [total_new, q_heads, num_splits]: their log2-sum-exp2
    req_to_token_ptr,  # *i32 [max_requests, max_model_len]: pool row of token j of request r
    slots_ptr,  # *i32 [batch]: req_to_token row of each request
    prefix_lens_ptr,  # *i32 [batch]: tokens cached before the new ones
    cu_new_lens_ptr,  # *i32 [batch + 1]: cumulative new-token offsets into q
    q_token_stride,  # elements between tokens of q
    q_head_stride,  # elements between heads of q
    k_row_stride,  # elements between pool rows of k_cache
    k_head_stride,  # elements between heads of k_cache
    v_row_stride,  # elements between pool rows of v_cache
    v_head_stride,  # elements between heads of v_cache
    out_token_stride,  # elements between tokens of out
    out_head_stride,  # elements between heads of out
    req_to_token_stride,  # elements between rows of req_to_token
    group,  # q_heads // kv_heads
    tokens_per_block,  # new tokens per program: BLOCK_M // group
    num_splits,  # key slices per (token block, kv head); 1 = no split (runtime)
    qk_scale,  # softmax scale * log2(e): scores live in the exp2 domain
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per program: tokens_per_block tokens x group heads (padded)
    BLOCK_N: tl.constexpr,  # context tokens per inner step
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no TF32), else "tf32" (the default)
    DOT_IN_FP32: tl.constexpr,  # interpreter only: its tl.dot cannot multiply bf16, so upcast first
):
    m_block = tl.program_id(0)
    request = tl.program_id(1)
    kv_head = tl.program_id(2) // num_splits
    split = tl.program_id(2) % num_splits
    new_start = tl.load(cu_new_lens_ptr + request)
    new_len = tl.load(cu_new_lens_ptr + request + 1) - new_start
    first = m_block * tokens_per_block  # first new token (within the request) of this block
    if first >= new_len:
        return
    prefix_len = tl.load(prefix_lens_ptr + request)
    slot = tl.load(slots_ptr + request).to(tl.int64)

    rows = tl.arange(0, BLOCK_M)
    offs_m = first + rows // group  # [BLOCK_M] new-token index of each row
    heads = kv_head * group + rows % group  # [BLOCK_M] query head of each row
    m_mask = (rows < tokens_per_block * group) & (offs_m < new_len)
    dims = tl.arange(0, HEAD_DIM)
    q_tokens = (new_start + offs_m).to(tl.int64)
    q_ptrs = q_ptr + q_tokens[:, None] * q_token_stride + heads[:, None] * q_head_stride + dims[None, :]
    query = tl.load(q_ptrs, mask=m_mask[:, None], other=0.0)  # [BLOCK_M, HEAD_DIM]
    if DOT_IN_FP32:
        query = query.to(tl.float32)
    q_pos = prefix_len + offs_m  # absolute position of each row's token

    # keys [0, full_end) are seen by every row (whole tiles); the block's last token sees < ctx_end
    full_end = (prefix_len + first + 1) // BLOCK_N * BLOCK_N
    ctx_end = prefix_len + tl.minimum(first + tokens_per_block, new_len)
    # this program's slice of the keys, in whole tiles: [lo, hi), unmasked up to mid
    split_len = ((prefix_len + new_len + num_splits - 1) // num_splits + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    lo = split * split_len
    hi = tl.minimum(lo + split_len, ctx_end)
    mid = tl.maximum(tl.minimum(full_end, hi), lo)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max (log2 domain)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    r2t_row = req_to_token_ptr + slot * req_to_token_stride
    for n_start in range(lo, mid, BLOCK_N):  # below the diagonal: no masks
        offs_n = n_start + tl.arange(0, BLOCK_N)
        m_i, l_i, acc = attend_block(query, m_i, l_i, acc, r2t_row, offs_n, offs_n < mid,
                                     offs_n[None, :] < mid, k_cache_ptr, v_cache_ptr, kv_head,
                                     k_row_stride, k_head_stride, v_row_stride, v_head_stride,
                                     qk_scale, HEAD_DIM, False, DOT_PRECISION, DOT_IN_FP32)
    for n_start in range(mid, hi, BLOCK_N):  # the diagonal: causal mask + bounds
        offs_n = n_start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        visible = (offs_n[None, :] <= q_pos[:, None]) & n_mask[None, :]
        m_i, l_i, acc = attend_block(query, m_i, l_i, acc, r2t_row, offs_n, n_mask, visible,
                                     k_cache_ptr, v_cache_ptr, kv_head, k_row_stride,
                                     k_head_stride, v_row_stride, v_head_stride, qk_scale,
                                     HEAD_DIM, True, DOT_PRECISION, DOT_IN_FP32)

    if num_splits == 1:  # every row saw key 0: l_i > 0
        out = acc / l_i[:, None]
        o_ptrs = out_ptr + q_tokens[:, None] * out_token_stride + heads[:, None] * out_head_stride + dims[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None])
    else:
        seen = l_i > 0  # false for a slice wholly after a row's position
        safe_l = tl.where(seen, l_i, 1.0)
        partial = tl.where(seen[:, None], acc / safe_l[:, None], 0.0)
        lse = tl.where(seen, m_i + tl.log2(safe_l), float("-inf"))
        q_heads = group * (tl.num_programs(2) // num_splits)
        base = (q_tokens * q_heads + heads) * num_splits + split  # [BLOCK_M]
        tl.store(partial_out_ptr + base[:, None] * HEAD_DIM + dims[None, :], partial, mask=m_mask[:, None])
        tl.store(partial_lse_ptr + base, lse, mask=m_mask)


def _pick_blocks(head_dim: int, dtype: torch.dtype, group: int) -> tuple[int, int, int]:
    """(BLOCK_M rows, BLOCK_N, num_warps): small tiles in the interpreter, register-sized on GPU.

    BLOCK_M is at least the group (one token's heads fit one block)."""
    if interpret_mode():
        block_m, block_n, num_warps = 16, 16, 1
    elif dtype == torch.float32:  # fp32 dots run on FMA units: 4 warps spill at sm_90, 8 do not
        block_m, block_n, num_warps = 32, 16, 8
    elif head_dim > 128:
        block_m, block_n, num_warps = 64, 32, 4
    else:
        block_m, block_n, num_warps = 128, 64, 8
    return max(block_m, triton.next_power_of_2(group)), block_n, num_warps


def _pick_num_splits(programs: int, max_context: int, total_new: int, q_heads: int,
                     head_dim: int, device: torch.device) -> int:
    """Key slices per program: 1 when the programs fill the device, else enough to (nearly) fill
    it, never slices shorter than MIN_SPLIT_TOKENS of `max_context`, partials under the cap."""
    busy = target_programs(device) // 2
    if programs >= busy:
        return 1
    min_split = 16 if interpret_mode() else MIN_SPLIT_TOKENS
    by_memory = PARTIAL_BYTES_CAP // max(total_new * q_heads * (head_dim + 1) * 4, 1)
    splits = min(triton.cdiv(busy, programs), triton.cdiv(max(max_context, 1), min_split),
                 MAX_SPLITS, by_memory)
    return max(splits, 1)


def _check(q: Tensor, k_cache: Tensor, v_cache: Tensor, req_to_token: Tensor, slots: Tensor,
           prefix_lens: Tensor, cu_new_lens: Tensor) -> None:
    _checks.check_queries_over_pool(q, k_cache, v_cache, req_to_token)
    for name, index in (("slots", slots), ("prefix_lens", prefix_lens), ("cu_new_lens", cu_new_lens)):
        _checks.check_index(name, index)
        _checks.check_contiguous(name, index)
    _checks.check_length("prefix_lens", prefix_lens, slots.shape[0])
    _checks.check_length("cu_new_lens", cu_new_lens, slots.shape[0] + 1)
    _checks.check_same_device(q=q, k_cache=k_cache, req_to_token=req_to_token, slots=slots,
                              prefix_lens=prefix_lens, cu_new_lens=cu_new_lens)


def prefill_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    req_to_token: Tensor,
    slots: Tensor,
    prefix_lens: Tensor,
    cu_new_lens: Tensor,
    max_new_len: int,
    scale: float,
    max_context_len: int | None = None,
) -> Tensor:
    """Causal GQA attention of new tokens q [total_new, q_heads, d] over prefix + themselves.

    max_context_len (optional, host-side): the longest prefix + chunk in the batch; it only bounds
    the split count (default: req_to_token's width, max_model_len). Lengths are read on the device.
    """
    _check(q, k_cache, v_cache, req_to_token, slots, prefix_lens, cu_new_lens)
    total_new, q_heads, head_dim = q.shape
    batch = slots.shape[0]
    kv_heads = k_cache.shape[1]
    group = q_heads // kv_heads
    out = torch.empty((total_new, q_heads, head_dim), dtype=q.dtype, device=q.device)
    if total_new == 0 or batch == 0 or max_new_len <= 0:
        return out
    block_m, block_n, num_warps = _pick_blocks(head_dim, q.dtype, group)
    tokens_per_block = block_m // group
    m_blocks = triton.cdiv(int(max_new_len), tokens_per_block)
    max_context = req_to_token.shape[1] if max_context_len is None else int(max_context_len)
    num_splits = _pick_num_splits(m_blocks * batch * kv_heads, max_context, total_new, q_heads,
                                  head_dim, q.device)
    partial_shape = (total_new, q_heads, num_splits) if num_splits > 1 else (1, 1, 1)
    partial_out = torch.empty((*partial_shape, head_dim), dtype=torch.float32, device=q.device)
    partial_lse = torch.empty(partial_shape, dtype=torch.float32, device=q.device)
    _prefill_attention_kernel[(m_blocks, batch, kv_heads * num_splits)](
        q, k_cache, v_cache, out, partial_out, partial_lse,
        req_to_token, slots, prefix_lens, cu_new_lens,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1),
        out.stride(0), out.stride(1),
        req_to_token.stride(0),
        group,
        tokens_per_block,
        num_splits,
        float(scale) * LOG2_E,
        HEAD_DIM=head_dim,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        DOT_PRECISION=dot_precision(q.dtype),
        DOT_IN_FP32=dot_in_fp32(q.dtype),
        num_warps=num_warps,
        num_stages=2,
    )
    if num_splits > 1:
        combine_splits(partial_out, partial_lse, out)
    return out
