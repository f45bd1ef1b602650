"""Pure-torch twins of the Triton kernels: the test oracle and the CPU serving path.

Every function computes norms and softmax in float32 and returns the input dtype.
Attention reads K/V from a token-level pool through the request->token table
(`req_to_token[slot, j]` = pool row of token j of that request).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor
import torch.nn.functional as F


def rms_norm(
    x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """RMSNorm with optional fused residual add; returns (normed * weight, new residual)."""
    # x, residual: [tokens, hidden]; weight: [hidden]
    if residual is not None:
        x = x + residual
    x_f32 = x.float()
    variance = x_f32.pow(2).mean(-1, keepdim=True)
    normed = (x_f32 * torch.rsqrt(variance + eps)).to(x.dtype)
    return (normed * weight).to(x.dtype), x


def _llama3_inv_freq(inv_freq: Tensor, scaling: dict) -> Tensor:
    """Llama 3.1 frequency scaling: slow waves divided by `factor`, a smooth ramp in between."""
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    old_context_len = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def build_rope_cache(
    head_dim: int,
    max_positions: int,
    base: float,
    rope_scaling: dict | None,
    device: torch.device | str | None,
) -> Tensor:
    """[max_positions, head_dim] float32 table: cos in the first half, sin in the second."""
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even number, got {head_dim}")
    if max_positions <= 0:
        raise ValueError(f"max_positions must be > 0, got {max_positions}")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (base**exponents)  # [head_dim / 2]
    rope_type = None
    if rope_scaling is not None:
        rope_type = rope_scaling.get("rope_type", rope_scaling.get("type"))
    if rope_type in (None, "default"):
        pass
    elif rope_type == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, rope_scaling)
    elif rope_type == "linear":
        inv_freq = inv_freq / float(rope_scaling["factor"])
    else:
        raise ValueError(
            f"rope_scaling.rope_type {rope_type!r} is not supported (supported: None, 'llama3', 'linear')"
        )
    positions = torch.arange(max_positions, device=device, dtype=torch.int64).float()
    freqs = positions[:, None] * inv_freq[None, :]  # [max_positions, head_dim / 2]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).contiguous()


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Neox-style rotation of x [tokens, heads, head_dim] by cos/sin [tokens, 1, head_dim / 2]."""
    half = x.shape[-1] // 2
    x1 = x[..., :half].float()
    x2 = x[..., half:].float()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def apply_rope(q: Tensor, k: Tensor, positions: Tensor, cos_sin: Tensor) -> None:
    """Rotate q [tokens, q_heads, head_dim] and k [tokens, kv_heads, head_dim] in place by position."""
    half = q.shape[-1] // 2
    table = cos_sin[positions]  # [tokens, head_dim]
    cos = table[:, None, :half]
    sin = table[:, None, half:]
    q.copy_(_rotate(q, cos, sin))
    k.copy_(_rotate(k, cos, sin))


def silu_and_mul(x: Tensor) -> Tensor:
    """[tokens, 2 * inter] (gate | up) -> [tokens, inter] = silu(gate) * up."""
    inter = x.shape[-1] // 2
    gate = x[:, :inter].float()
    up = x[:, inter:].float()
    return (F.silu(gate) * up).to(x.dtype)


def store_kv(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, rows: Tensor) -> None:
    """Scatter k, v [tokens, kv_heads, head_dim] into pool rows `rows` [tokens]."""
    k_cache.index_copy_(0, rows, k.to(k_cache.dtype))
    v_cache.index_copy_(0, rows, v.to(v_cache.dtype))


def rope_then_store(apply_rope_op: Callable, store_kv_op: Callable) -> Callable:
    """rope_and_store_kv made of a backend's own two ops (for backends without a fused one)."""
    def rope_and_store_kv(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, cos_sin: Tensor,
                          k_cache: Tensor, v_cache: Tensor, rows: Tensor) -> None:
        apply_rope_op(q, k, positions, cos_sin)
        store_kv_op(k_cache, v_cache, k, v, rows)
    return rope_and_store_kv


# apply_rope on q and k in place, then store_kv of the rotated k and v at `rows`
rope_and_store_kv = rope_then_store(apply_rope, store_kv)


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
    """Causal GQA attention of a flat batch of new tokens over cached prefix + themselves."""
    # q: [total_new, q_heads, d]; k_cache, v_cache: [capacity, kv_heads, d]
    q_heads = q.shape[1]
    group = q_heads // k_cache.shape[1]
    out = torch.empty_like(q)
    slot_list = slots.tolist()
    prefix_list = prefix_lens.tolist()
    cu_list = cu_new_lens.tolist()
    for b, slot in enumerate(slot_list):
        start, end = cu_list[b], cu_list[b + 1]
        n_new = end - start
        if n_new == 0:
            continue
        ctx = prefix_list[b] + n_new
        rows = req_to_token[slot, :ctx].long()  # [ctx]
        keys = k_cache.index_select(0, rows).float().transpose(0, 1)  # [kv_heads, ctx, d]
        values = v_cache.index_select(0, rows).float().transpose(0, 1)  # [kv_heads, ctx, d]
        query = q[start:end].float().transpose(0, 1)  # [q_heads, n_new, d]
        if prefix_list[b] == 0:  # plain causal: lets SDPA use its fused kernel
            mask, causal = None, True
        else:  # new token i sits at prefix + i: causal aligned to the bottom right
            q_pos = torch.arange(n_new, device=q.device)[:, None] + prefix_list[b]
            mask, causal = torch.arange(ctx, device=q.device)[None, :] <= q_pos, False
        attn = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, is_causal=causal,
                                              scale=scale, enable_gqa=group > 1)
        out[start:end] = attn.transpose(0, 1).to(q.dtype)
    return out


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
    """One query per request over its first seq_lens[b] tokens; batched by padding to max_seq_len.

    max_seq_len must be >= max(seq_lens) (checked on CPU only, to avoid a device sync).
    """
    # q: [batch, q_heads, d]; k_cache, v_cache: [capacity, kv_heads, d]
    batch, q_heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    group = q_heads // kv_heads
    if seq_lens.device.type == "cpu" and batch and int(seq_lens.max()) > max_seq_len:
        raise ValueError(f"max_seq_len ({max_seq_len}) must be >= the longest seq_len ({int(seq_lens.max())})")
    width = min(max(int(max_seq_len), 1), req_to_token.shape[1])
    cols = torch.arange(width, device=q.device)  # [width]
    valid = cols[None, :] < seq_lens.long()[:, None]  # [batch, width]
    rows = req_to_token[slots.long(), :width].long()  # [batch, width]
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    # the group's query heads act as the "query positions" of one kv head: one SDPA call,
    # no repeat of K/V per query head (fp32 inside, as the Triton kernel accumulates)
    flat = rows.view(-1)  # index_select: far cheaper than advanced indexing on CPU
    keys = k_cache.index_select(0, flat).float().view(batch, width, kv_heads, head_dim)
    values = v_cache.index_select(0, flat).float().view(batch, width, kv_heads, head_dim)
    keys, values = keys.transpose(1, 2), values.transpose(1, 2)  # [batch, kv_heads, width, d]
    query = q.float().reshape(batch, kv_heads, group, head_dim)
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=valid[:, None, None, :],
                                         scale=scale)  # [batch, kv_heads, group, d]
    out = torch.nan_to_num(out, nan=0.0)  # rows with seq_len 0 give zeros, not NaN
    return out.reshape(batch, q_heads, head_dim).to(q.dtype)


def argmax_rows(x: Tensor) -> Tensor:
    """x.argmax(dim=-1) for [rows, cols] logits (int64 [rows]); the first maximum wins."""
    return x.argmax(dim=-1)
