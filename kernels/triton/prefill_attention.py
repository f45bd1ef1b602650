"""Variable-length causal GQA flash attention for prefill, reading K/V through the request->token table.

Twin of kernels.reference.prefill_attention. One program handles BLOCK_M new tokens of one request
for one query head and streams the request's cached prefix plus its new tokens in BLOCK_N chunks
with an online (running max / running sum) softmax (kernels/triton/online_softmax.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _checks
from .launch import LOG2_E, dot_in_fp32, dot_precision, interpret_mode
from .online_softmax import attend_block



@triton.jit
def _prefill_attention_kernel(
    q_ptr,  # *T [total_new, q_heads, HEAD_DIM]: queries of the new tokens
    k_cache_ptr,  # *T [capacity, kv_heads, HEAD_DIM]: K pool (new tokens already stored)
    v_cache_ptr,  # *T [capacity, kv_heads, HEAD_DIM]: V pool
    out_ptr,  # *T [total_new, q_heads, HEAD_DIM]: attention output
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
    qk_scale,  # softmax scale * log2(e): scores live in the exp2 domain
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,  # new tokens per program
    BLOCK_N: tl.constexpr,  # context tokens per inner step
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no TF32), else "tf32" (the default)
    DOT_IN_FP32: tl.constexpr,  # interpreter only: its tl.dot cannot multiply bf16, so upcast first
):
    m_block = tl.program_id(0)
    request = tl.program_id(1)
    head = tl.program_id(2)
    kv_head = head // group
    new_start = tl.load(cu_new_lens_ptr + request)
    new_len = tl.load(cu_new_lens_ptr + request + 1) - new_start
    if m_block * BLOCK_M >= new_len:
        return
    prefix_len = tl.load(prefix_lens_ptr + request)
    slot = tl.load(slots_ptr + request).to(tl.int64)

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # index among this request's new tokens
    dims = tl.arange(0, HEAD_DIM)
    m_mask = offs_m < new_len
    q_tokens = (new_start + offs_m).to(tl.int64)
    q_ptrs = q_ptr + q_tokens[:, None] * q_token_stride + head * q_head_stride + dims[None, :]
    query = tl.load(q_ptrs, mask=m_mask[:, None], other=0.0)  # [BLOCK_M, HEAD_DIM]
    if DOT_IN_FP32:
        query = query.to(tl.float32)
    q_pos = prefix_len + offs_m  # absolute position of each query

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max (log2 domain)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # the last query of this block sees positions < ctx_end; position 0 is visible to every row
    ctx_end = prefix_len + tl.minimum((m_block + 1) * BLOCK_M, new_len)
    r2t_row = req_to_token_ptr + slot * req_to_token_stride
    for n_start in range(0, ctx_end, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < ctx_end
        visible = (offs_n[None, :] <= q_pos[:, None]) & n_mask[None, :]  # causal + bounds
        m_i, l_i, acc = attend_block(query, m_i, l_i, acc, r2t_row, offs_n, n_mask, visible,
                                     k_cache_ptr, v_cache_ptr, kv_head, k_row_stride,
                                     k_head_stride, v_row_stride, v_head_stride, qk_scale,
                                     HEAD_DIM, DOT_PRECISION, DOT_IN_FP32)

    out = acc / l_i[:, None]
    o_ptrs = out_ptr + q_tokens[:, None] * out_token_stride + head * out_head_stride + dims[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None])


def _pick_blocks(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): small tiles in the interpreter, shared-memory-sized on GPU."""
    if interpret_mode():
        return 16, 16, 1
    if dtype == torch.float32 or head_dim > 128:
        return 32, 32, 4
    return 64, 64, 4


def _check(q: Tensor, k_cache: Tensor, v_cache: Tensor, req_to_token: Tensor, slots: Tensor,
           prefix_lens: Tensor, cu_new_lens: Tensor) -> None:
    _checks.check_kv_pool(k_cache, v_cache)
    _checks.check_rank("q", q, 3)
    _checks.check_unit_last_stride("q", q)
    if q.dtype != k_cache.dtype or q.shape[2] != k_cache.shape[2]:
        raise ValueError(
            f"q must share dtype and head_dim with the pool ({k_cache.dtype}, {k_cache.shape[2]}), "
            f"got {q.dtype}, {q.shape[2]}"
        )
    _checks.check_gqa(q.shape[1], k_cache.shape[1])
    if req_to_token.dtype != torch.int32 or req_to_token.dim() != 2:
        raise ValueError(f"req_to_token must be 2-D int32, got {req_to_token.dtype} {tuple(req_to_token.shape)}")
    _checks.check_unit_last_stride("req_to_token", req_to_token)
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
) -> Tensor:
    """Causal GQA attention of new tokens q [total_new, q_heads, d] over prefix + themselves."""
    _check(q, k_cache, v_cache, req_to_token, slots, prefix_lens, cu_new_lens)
    total_new, q_heads, head_dim = q.shape
    batch = slots.shape[0]
    out = torch.empty((total_new, q_heads, head_dim), dtype=q.dtype, device=q.device)
    if total_new == 0 or batch == 0 or max_new_len <= 0:
        return out
    block_m, block_n, num_warps = _pick_blocks(head_dim, q.dtype)
    grid = (triton.cdiv(int(max_new_len), block_m), batch, q_heads)
    _prefill_attention_kernel[grid](
        q, k_cache, v_cache, out, req_to_token, slots, prefix_lens, cu_new_lens,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1),
        out.stride(0), out.stride(1),
        req_to_token.stride(0),
        q_heads // k_cache.shape[1],
        float(scale) * LOG2_E,
        HEAD_DIM=head_dim,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        DOT_PRECISION=dot_precision(q.dtype),
        DOT_IN_FP32=dot_in_fp32(q.dtype),
        num_warps=num_warps,
        num_stages=2,
    )
    return out
