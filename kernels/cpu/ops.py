"""The CPU serving path: ops shaped for CPU speed, each tested against its twin in
kernels.reference (the oracle, which stays the simplest correct version).

Where the C kernels of kernels.cpu.native are built (a C compiler is there), attention, RoPE,
RMSNorm and SiLU*up run in them; otherwise in torch.
Differences from the reference, all measured on the 2-core AMD EPYC this was built on:
- RoPE and SiLU*up run in the model's dtype, as transformers does (a bf16 model rotates in bf16);
  for fp32 models the numbers are the reference's (SiLU's exp within 2 ulp).
- Attention reads K/V rows where they lie in the pool (C kernel), decode and prefill alike: each
  new token of a prefill chunk is a query over its prefix and itself. 32 requests x ~160 keys,
  bf16: ~0.9 -> ~0.3 ms per layer in the engine (memory-bound now); the prefill of 32 prompts
  of ~100 tokens: ~20 -> ~5 ms per layer. With AVX512-BF16 and a bf16 pool, the tokens of a
  prefill chunk go in blocks of 48 query rows per pass over the keys (online softmax, bf16
  probabilities as torch's SDPA has them): a 2048-token chunk ~72 -> ~32 ms per layer on one
  core, 2.2x; LLMSERVE_CPU_PREFILL_BLOCKS=0 turns that off.
- Without the C kernels: decode attention is SDPA in the pool's dtype on gathered K/V; prefill
  pads chunks of similar length into groups run as batched matrix products (Q.K^T in fp32, P.V
  in the pool's dtype) for bf16, one SDPA call per chunk for fp32; long chunks go one at a time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels import reference
from kernels.cpu import native
from kernels.reference import build_rope_cache, store_kv

__all__ = ["build_rope_cache", "rms_norm", "store_kv", "apply_rope", "rope_and_store_kv",
           "silu_and_mul", "decode_attention", "prefill_attention", "per_token_queries",
           "argmax_rows"]

# a prefill chunk longer than this attends alone (SDPA), not in a padded group
GROUP_MAX_NEW_TOKENS = 256
# cap on one group's fp32 score tensor: requests * q_heads * max_new * max_ctx elements
GROUP_MAX_SCORES = 1 << 23


def rms_norm(x: Tensor, weight: Tensor, eps: float,
             residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """RMSNorm with optional fused residual add; returns (normed * weight, new residual)."""
    lib = native.load() if native.elementwise_ok(x, weight, residual) else None
    if lib is not None:
        return native.rms_norm(lib, x, weight, eps, residual)
    return reference.rms_norm(x, weight, eps, residual)


def apply_rope(q: Tensor, k: Tensor, positions: Tensor, cos_sin: Tensor) -> None:
    """Rotate q [tokens, q_heads, head_dim] and k [tokens, kv_heads, head_dim] in place (views
    with a unit last stride are fine), computing in q's dtype."""
    lib = native.load() if native.elementwise_ok(q, k) else None
    if lib is not None and q.stride(2) == 1 and k.stride(2) == 1:
        native.rope(lib, q, positions, cos_sin)
        native.rope(lib, k, positions, cos_sin)
        return
    half = q.shape[-1] // 2
    table = cos_sin.index_select(0, positions).to(q.dtype)  # [tokens, head_dim]
    cos = table[:, None, :half]  # [tokens, 1, half]
    sin = table[:, None, half:]
    for x in (q, k):
        first, second = x[..., :half], x[..., half:]
        new_first = first * cos - second * sin
        new_second = second * cos + first * sin
        first.copy_(new_first)
        second.copy_(new_second)


# without the C kernels: this module's RoPE, then the reference scatter
_rope_then_store = reference.rope_then_store(apply_rope, store_kv)


def rope_and_store_kv(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, cos_sin: Tensor,
                      k_cache: Tensor, v_cache: Tensor, rows: Tensor) -> None:
    """apply_rope(q, k) then store_kv(k, v -> pool rows): one C pass where the C kernels are
    built and the tensors fit it (saves a call and a re-read of k per layer)."""
    lib = native.load()
    if lib is not None and native.rope_store_ok(q, k, v, k_cache, v_cache):
        native.rope_store_kv(lib, q, k, v, positions, cos_sin, k_cache, v_cache, rows,
                                 checked=True)
        return
    _rope_then_store(q, k, v, positions, cos_sin, k_cache, v_cache, rows)


def argmax_rows(x: Tensor) -> Tensor:
    """x.argmax(dim=-1) for [rows, cols] logits; the C loop where it applies (torch's CPU argmax
    is scalar: 0.66 ms for 32 x 49152 here, the C one ~0.05 ms)."""
    ok = (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2
          and x.stride(-1) == 1 and x.shape[1] > 0)
    lib = native.load() if ok else None
    return native.argmax_rows(lib, x) if lib is not None else x.argmax(dim=-1)


def silu_and_mul(x: Tensor) -> Tensor:
    """[tokens, 2 * inter] (gate | up) -> [tokens, inter] = silu(gate) * up, in x's dtype."""
    lib = native.load() if native.elementwise_ok(x) and x.stride(-1) == 1 else None
    if lib is not None:
        return native.silu_and_mul(lib, x)
    inter = x.shape[-1] // 2
    return F.silu(x[:, :inter]) * x[:, inter:]


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, req_to_token: Tensor,
                     slots: Tensor, seq_lens: Tensor, scale: float, max_seq_len: int) -> Tensor:
    """One query per request over its first seq_lens[b] tokens; requests with seq_len 0 get
    zeros. max_seq_len (>= max(seq_lens)) sizes the SDPA path's padding; the C kernel needs none."""
    # q: [batch, q_heads, d]; k_cache, v_cache: [capacity, kv_heads, d]
    lib = native.load() if native.supports(q, k_cache) else None
    if lib is not None:   # reads exactly seq_lens[b] keys: max_seq_len is not needed
        return native.pool_attention(lib, q, k_cache, v_cache, req_to_token, slots,
                                         seq_lens, scale)
    longest = int(seq_lens.max()) if q.shape[0] else 0
    if longest > max_seq_len:
        raise ValueError(f"max_seq_len ({max_seq_len}) must be >= the longest seq_len "
                         f"({longest})")
    return _decode_sdpa(q, k_cache, v_cache, req_to_token, slots, seq_lens, scale, max_seq_len)


def _decode_sdpa(q: Tensor, k_cache: Tensor, v_cache: Tensor, req_to_token: Tensor,
                 slots: Tensor, seq_lens: Tensor, scale: float, max_seq_len: int) -> Tensor:
    """decode_attention without the native kernel: gather, then SDPA in the pool's dtype."""
    batch, q_heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    width = min(max(int(max_seq_len), 1), req_to_token.shape[1])
    valid = torch.arange(width, device=q.device)[None, :] < seq_lens[:, None]  # [batch, width]
    rows = req_to_token[slots.long(), :width].masked_fill(~valid, 0).view(-1)  # [batch * width]
    keys = k_cache.index_select(0, rows).view(batch, width, kv_heads, head_dim).transpose(1, 2)
    values = v_cache.index_select(0, rows).view(batch, width, kv_heads, head_dim).transpose(1, 2)
    # keys, values: [batch, kv_heads, width, d]; the group's query heads act as query rows
    # (SDPA's CPU kernel is several times slower on a strided query: copy it)
    query = q.to(k_cache.dtype).contiguous().view(batch, kv_heads, q_heads // kv_heads, head_dim)
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=valid[:, None, None, :],
                                         scale=scale)  # [batch, kv_heads, group, d]; 0 if masked
    return out.reshape(batch, q_heads, head_dim).to(q.dtype)


def per_token_queries(slots: Tensor, prefix_lens: Tensor, cu_new_lens: Tensor,
                      tokens: int) -> tuple[Tensor, Tensor]:
    """Every new token of the prefill chunks as a query of its own: its table slot and how
    many keys it sees (token i of a chunk after `prefix` cached ones sees prefix + i + 1)."""
    new_lens = cu_new_lens[1:] - cu_new_lens[:-1]  # [batch]
    token_slots = slots.repeat_interleave(new_lens)  # [tokens]
    within = torch.arange(tokens, device=slots.device) - cu_new_lens[:-1].repeat_interleave(
        new_lens)
    return token_slots, prefix_lens.repeat_interleave(new_lens) + within + 1


def prefill_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, req_to_token: Tensor,
                      slots: Tensor, prefix_lens: Tensor, cu_new_lens: Tensor, max_new_len: int,
                      scale: float) -> Tensor:
    """Causal GQA attention of a flat batch of new tokens over cached prefix + themselves."""
    # q: [total_new, q_heads, d]; k_cache, v_cache: [capacity, kv_heads, d]
    lib = native.load() if native.supports(q, k_cache) else None
    if lib is not None and q.shape[0]:
        token_slots, visible = per_token_queries(slots, prefix_lens, cu_new_lens, q.shape[0])
        return native.pool_attention(lib, q, k_cache, v_cache, req_to_token, token_slots,
                                         visible, scale)
    out = torch.empty_like(q)
    slot_list, prefix_list, cu_list = slots.tolist(), prefix_lens.tolist(), cu_new_lens.tolist()
    chunks = [(cu_list[b], cu_list[b + 1] - cu_list[b], prefix_list[b], slot_list[b])
              for b in range(len(slot_list)) if cu_list[b + 1] > cu_list[b]]
    # fp32 is the exact-parity mode: every chunk through SDPA, as transformers computes it
    groups = [[c] for c in chunks] if q.dtype == torch.float32 else _groups(chunks, q.shape[1])
    for group in groups:
        if len(group) == 1:
            _attend_one(out, q, k_cache, v_cache, req_to_token, group[0], scale)
        else:
            _attend_group(out, q, k_cache, v_cache, req_to_token, group, scale)
    return out


Chunk = tuple[int, int, int, int]   # (start in q, new tokens, prefix tokens, table slot)


def _groups(chunks: list[Chunk], q_heads: int) -> list[list[Chunk]]:
    """Chunks sorted by context length, cut into groups whose padded scores fit the cap."""
    groups: list[list[Chunk]] = []
    current: list[Chunk] = []
    for chunk in sorted(chunks, key=lambda c: c[1] + c[2]):
        if chunk[1] > GROUP_MAX_NEW_TOKENS:
            groups.append([chunk])
            continue
        max_new = max([c[1] for c in current] + [chunk[1]])
        ctx = chunk[1] + chunk[2]   # sorted: the largest context so far
        if current and (len(current) + 1) * q_heads * max_new * ctx > GROUP_MAX_SCORES:
            groups.append(current)
            current = []
        current.append(chunk)
    if current:
        groups.append(current)
    return groups


def _attend_one(out: Tensor, q: Tensor, k_cache: Tensor, v_cache: Tensor,
                req_to_token: Tensor, chunk: Chunk, scale: float) -> None:
    """SDPA for one chunk; memory linear in its length."""
    start, n_new, prefix, slot = chunk
    ctx = prefix + n_new
    rows = req_to_token[slot, :ctx].long()  # [ctx]
    keys = k_cache.index_select(0, rows).transpose(0, 1)  # [kv_heads, ctx, d]
    values = v_cache.index_select(0, rows).transpose(0, 1)
    query = q[start:start + n_new].to(k_cache.dtype).transpose(0, 1)  # [q_heads, n_new, d]
    mask = None
    if prefix:  # new token i sits at prefix + i: causal aligned to the bottom right
        cols, new_rows = torch.arange(ctx, device=q.device), torch.arange(n_new, device=q.device)
        mask = cols[None, :] <= new_rows[:, None] + prefix
    attn = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask,
                                          is_causal=mask is None, scale=scale,
                                          enable_gqa=query.shape[0] != keys.shape[0])
    out[start:start + n_new] = attn.transpose(0, 1).to(q.dtype)


def _attend_group(out: Tensor, q: Tensor, k_cache: Tensor, v_cache: Tensor,
                  req_to_token: Tensor, group: list[Chunk], scale: float) -> None:
    """Padded batched attention for chunks of similar length."""
    q_heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k_cache.shape[1]
    n_req, group_size = len(group), q_heads // kv_heads
    starts, news, prefixes, slot_ids = (torch.tensor(col, device=q.device) for col in zip(*group))
    max_new, max_ctx = int(news.max()), int((news + prefixes).max())
    new_pos = torch.arange(max_new, device=q.device)
    ctx_pos = torch.arange(max_ctx, device=q.device)
    # query index [n_req, max_new]: padding rows repeat the chunk's last token (dropped later)
    q_index = starts[:, None] + torch.minimum(new_pos[None, :], news[:, None] - 1)
    query = q.index_select(0, q_index.view(-1)).view(n_req, max_new, kv_heads, group_size,
                                                     head_dim)
    query = query.permute(0, 2, 3, 1, 4).float()  # [n_req, kv_heads, group, max_new, d]
    # visible[b, i, j]: key j is in request b's context and not after new token i
    visible = ctx_pos[None, None, :] <= (prefixes[:, None, None] + new_pos[None, :, None])
    visible &= ctx_pos[None, None, :] < (prefixes + news)[:, None, None]
    rows = req_to_token[slot_ids.long(), :max_ctx].masked_fill(~visible[:, -1, :], 0)
    keys = k_cache.index_select(0, rows.view(-1)).view(n_req, max_ctx, kv_heads, head_dim)
    values = v_cache.index_select(0, rows.view(-1)).view(n_req, max_ctx, kv_heads, head_dim)
    keys_t = keys.permute(0, 2, 3, 1).float()[:, :, None]  # [n_req, kv_heads, 1, d, max_ctx]
    scores = torch.matmul(query, keys_t).mul_(scale)  # [n_req, kv_heads, group, max_new, max_ctx]
    scores.masked_fill_(~visible[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v_cache.dtype)
    attn = torch.matmul(probs, values.transpose(1, 2)[:, :, None])  # [..., max_new, d]
    attn = attn.permute(0, 3, 1, 2, 4).reshape(n_req * max_new, q_heads, head_dim)
    # keep the real rows: (b, i < news[b]) -> out[starts[b] + i]
    real = new_pos[None, :] < news[:, None]  # [n_req, max_new]
    source = (torch.arange(n_req, device=q.device)[:, None] * max_new + new_pos[None, :])[real]
    target = (starts[:, None] + new_pos[None, :])[real]
    out.index_copy_(0, target, attn.index_select(0, source).to(q.dtype))
