"""Builders for kernel tests: a scattered KV pool, a request->token table and naive attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

TOLERANCE = {torch.float32: 2e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@dataclass(slots=True)
class PoolBatch:
    """A batch of requests whose tokens sit in shuffled pool rows."""

    k_cache: Tensor  # [capacity, kv_heads, head_dim]
    v_cache: Tensor  # [capacity, kv_heads, head_dim]
    req_to_token: Tensor  # [max_requests, max_model_len] int32
    slots: Tensor  # [batch] int32
    prefix_lens: Tensor  # [batch] int32
    new_lens: Tensor  # [batch] int32
    cu_new_lens: Tensor  # [batch + 1] int32
    seq_lens: Tensor  # [batch] int32 (prefix + new)


def make_pool_batch(
    prefix_lens: list[int],
    new_lens: list[int],
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    spare_rows: int = 23,
) -> PoolBatch:
    """Random K/V in a pool with spare rows; each token gets a distinct, shuffled row.

    Unused table entries point at real (wrong) rows, so a kernel that reads past a request's
    length gives a visibly wrong answer instead of a lucky zero.
    """
    seq_lens = [p + n for p, n in zip(prefix_lens, new_lens)]
    batch = len(seq_lens)
    capacity = sum(seq_lens) + spare_rows
    max_model_len = max(seq_lens) + 5
    max_requests = batch + 3
    k_cache = torch.randn(capacity, kv_heads, head_dim, dtype=dtype).to(device)
    v_cache = torch.randn(capacity, kv_heads, head_dim, dtype=dtype).to(device)
    table = torch.randint(0, capacity, (max_requests, max_model_len), dtype=torch.int32)
    slots = torch.randperm(max_requests)[:batch].to(torch.int32)
    free_rows = torch.randperm(capacity).to(torch.int32)
    taken = 0
    for slot, length in zip(slots.tolist(), seq_lens):
        table[slot, :length] = free_rows[taken : taken + length]
        taken += length
    cu = torch.zeros(batch + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(new_lens, dtype=torch.int32), 0)
    as_int32 = lambda values: torch.tensor(values, dtype=torch.int32, device=device)  # noqa: E731
    return PoolBatch(
        k_cache=k_cache,
        v_cache=v_cache,
        req_to_token=table.to(device),
        slots=slots.to(device),
        prefix_lens=as_int32(prefix_lens),
        new_lens=as_int32(new_lens),
        cu_new_lens=cu.to(device),
        seq_lens=as_int32(seq_lens),
    )


def naive_attention_one(query: Tensor, keys: Tensor, values: Tensor, scale: float) -> Tensor:
    """One token: query [q_heads, d] over keys/values [ctx, kv_heads, d], float64, GQA by h // group."""
    q_heads = query.shape[0]
    group = q_heads // keys.shape[1]
    kv_of_head = torch.arange(q_heads) // group
    k = keys.double()[:, kv_of_head.to(keys.device)]  # [ctx, q_heads, d]
    v = values.double()[:, kv_of_head.to(keys.device)]
    scores = torch.einsum("hd,chd->hc", query.double(), k) * scale  # [q_heads, ctx]
    weights = torch.softmax(scores, dim=-1)
    return torch.einsum("hc,chd->hd", weights, v)


def naive_prefill(q: Tensor, pb: PoolBatch, scale: float) -> Tensor:
    """Token-by-token loop: new token i of request b attends to positions 0..prefix+i."""
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    for b, slot in enumerate(pb.slots.tolist()):
        prefix = int(pb.prefix_lens[b])
        start = int(pb.cu_new_lens[b])
        for i in range(int(pb.new_lens[b])):
            rows = pb.req_to_token[slot, : prefix + i + 1].long()
            out[start + i] = naive_attention_one(q[start + i], pb.k_cache[rows], pb.v_cache[rows], scale)
    return out


def naive_decode(q: Tensor, pb: PoolBatch, scale: float) -> Tensor:
    """Per-request loop over the first seq_lens[b] tokens; an empty request gives zeros."""
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    for b, slot in enumerate(pb.slots.tolist()):
        length = int(pb.seq_lens[b])
        if length:
            rows = pb.req_to_token[slot, :length].long()
            out[b] = naive_attention_one(q[b], pb.k_cache[rows], pb.v_cache[rows], scale)
    return out


def assert_close(actual: Tensor, expected: Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    """Compare in float64 with a dtype-dependent absolute+relative tolerance."""
    tol = TOLERANCE[dtype] * scale
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=tol, rtol=tol)
