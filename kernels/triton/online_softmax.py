"""The online-softmax step both attention kernels run per block of keys (Triton).

Prefill and decode attention stream a request's keys through the request->token table BLOCK_N
at a time. For one block this loads the keys' pool rows, K and V, scores the queries against the
keys (scores pre-scaled by softmax scale * log2(e), so exp2 stands in for exp), hides what each
query may not see, and folds the block into the running max, running sum and weighted-V
accumulator (flash attention's rescaling). The kernels differ only in which queries a program
holds, which keys it walks, and what `visible` says.

MASKED=False is the fast path for a block every query sees in full (prefill's tiles below the
diagonal): no load masks, no score select. With MASKED=True a query may see none of a block's keys
(a split-K slice past its position); its running max then stays -inf and the block adds nothing.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def attend_block(
    query,  # [ROWS, HEAD_DIM]: this program's queries (fp32 when DOT_IN_FP32)
    m_i,  # [ROWS] fp32: running max of the scores so far (log2 domain)
    l_i,  # [ROWS] fp32: running sum of exp2(score - m_i)
    acc,  # [ROWS, HEAD_DIM] fp32: running sum of exp2(score - m_i) * V
    r2t_row,  # *i32: the request's row of req_to_token
    offs_n,  # [BLOCK_N]: token indices of this block within the request
    n_mask,  # [BLOCK_N]: which of them exist (loads are masked by it)
    visible,  # [ROWS, BLOCK_N] or [1, BLOCK_N]: which keys each query sees (within n_mask)
    k_cache_ptr,  # *T [capacity, kv_heads, HEAD_DIM]: K pool
    v_cache_ptr,  # *T [capacity, kv_heads, HEAD_DIM]: V pool
    kv_head,  # the KV head these queries read
    k_row_stride,  # elements between pool rows of k_cache
    k_head_stride,  # elements between heads of k_cache
    v_row_stride,  # elements between pool rows of v_cache
    v_head_stride,  # elements between heads of v_cache
    qk_scale,  # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr,
    MASKED: tl.constexpr,  # False: every key of the block exists and every query sees it
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no TF32), else "tf32" (the default)
    DOT_IN_FP32: tl.constexpr,  # interpreter only: its tl.dot cannot multiply bf16, so upcast first
):
    """Returns the updated (m_i, l_i, acc)."""
    dims = tl.arange(0, HEAD_DIM)
    if MASKED:
        rows = tl.load(r2t_row + offs_n, mask=n_mask, other=0).to(tl.int64)  # [BLOCK_N] pool rows
    else:
        rows = tl.load(r2t_row + offs_n).to(tl.int64)
    k_ptrs = k_cache_ptr + rows[:, None] * k_row_stride + kv_head * k_head_stride + dims[None, :]
    if MASKED:
        keys = tl.load(k_ptrs, mask=n_mask[:, None], other=0.0)  # [BLOCK_N, HEAD_DIM]
    else:
        keys = tl.load(k_ptrs)
    if DOT_IN_FP32:
        keys = keys.to(tl.float32)
    scores = tl.dot(query, tl.trans(keys), input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        scores = tl.where(visible, scores, float("-inf"))  # [ROWS, BLOCK_N]
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    if MASKED:  # a row that has seen no key yet keeps m = -inf: subtract 0 instead (no NaN)
        m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)
    else:
        m_ref = m_new
    probs = tl.exp2(scores - m_ref[:, None])
    alpha = tl.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(probs, axis=1)
    v_ptrs = v_cache_ptr + rows[:, None] * v_row_stride + kv_head * v_head_stride + dims[None, :]
    if MASKED:
        values = tl.load(v_ptrs, mask=n_mask[:, None], other=0.0)  # [BLOCK_N, HEAD_DIM]
    else:
        values = tl.load(v_ptrs)
    if DOT_IN_FP32:
        values = values.to(tl.float32)
    acc = acc * alpha[:, None]
    acc += tl.dot(probs.to(values.dtype), values, input_precision=DOT_PRECISION)
    return m_new, l_i, acc
