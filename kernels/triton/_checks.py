"""Argument checks shared by the Triton wrappers (plain torch, no Triton import)."""

from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)
MIN_HEAD_DIM = 16
MAX_HEAD_DIM = 256


def check_rank(name: str, tensor: Tensor, rank: int) -> None:
    """Raise unless `tensor` has exactly `rank` dimensions."""
    if tensor.dim() != rank:
        raise ValueError(f"{name} must have {rank} dimensions, got shape {tuple(tensor.shape)}")


def check_float(name: str, tensor: Tensor) -> None:
    """Raise unless `tensor` is fp16, bf16 or fp32."""
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} dtype must be one of {FLOAT_DTYPES}, got {tensor.dtype}")


def check_index(name: str, tensor: Tensor, rank: int = 1) -> None:
    """Raise unless `tensor` is an int32/int64 tensor of the given rank."""
    check_rank(name, tensor, rank)
    if tensor.dtype not in INDEX_DTYPES:
        raise ValueError(f"{name} dtype must be int32 or int64, got {tensor.dtype}")


def check_unit_last_stride(name: str, tensor: Tensor) -> None:
    """Raise unless the last dimension is contiguous (stride 1)."""
    if tensor.shape[-1] > 1 and tensor.stride(-1) != 1:
        raise ValueError(f"{name} must have stride 1 in its last dimension, got strides {tensor.stride()}")


def check_contiguous(name: str, tensor: Tensor) -> None:
    """Raise unless `tensor` is fully contiguous."""
    if not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {tensor.stride()}")


def check_same_device(**tensors: Tensor) -> None:
    """Raise unless all tensors live on one device."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")


def check_length(name: str, tensor: Tensor, length: int) -> None:
    """Raise unless dimension 0 of `tensor` has `length` entries."""
    if tensor.shape[0] != length:
        raise ValueError(f"{name} must have {length} entries, got {tensor.shape[0]}")


def check_head_dim(head_dim: int) -> None:
    """Raise unless head_dim is a power of two in [MIN_HEAD_DIM, MAX_HEAD_DIM]."""
    is_pow2 = head_dim > 0 and head_dim & (head_dim - 1) == 0
    if not is_pow2 or not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(
            f"head_dim must be a power of two in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}] for the Triton kernels, "
            f"got {head_dim}"
        )


def check_gqa(q_heads: int, kv_heads: int) -> int:
    """Return q_heads // kv_heads, raising unless it divides evenly."""
    if kv_heads <= 0 or q_heads % kv_heads:
        raise ValueError(f"q_heads ({q_heads}) must be a positive multiple of kv_heads ({kv_heads})")
    return q_heads // kv_heads


def check_kv_pool(k_cache: Tensor, v_cache: Tensor) -> None:
    """Raise unless the K and V pools are [capacity, kv_heads, head_dim] twins."""
    check_rank("k_cache", k_cache, 3)
    check_rank("v_cache", v_cache, 3)
    if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ValueError(
            f"k_cache and v_cache must match, got {tuple(k_cache.shape)} {k_cache.dtype} "
            f"vs {tuple(v_cache.shape)} {v_cache.dtype}"
        )
    check_float("k_cache", k_cache)
    check_unit_last_stride("k_cache", k_cache)
    check_unit_last_stride("v_cache", v_cache)
    check_head_dim(k_cache.shape[2])


def check_queries_over_pool(q: Tensor, k_cache: Tensor, v_cache: Tensor,
                            req_to_token: Tensor) -> None:
    """q [tokens, q_heads, d] read against the K/V pool through the request->token table."""
    check_kv_pool(k_cache, v_cache)
    check_rank("q", q, 3)
    check_unit_last_stride("q", q)
    if q.dtype != k_cache.dtype or q.shape[2] != k_cache.shape[2]:
        raise ValueError(
            f"q must share dtype and head_dim with the pool ({k_cache.dtype}, {k_cache.shape[2]}), "
            f"got {q.dtype}, {q.shape[2]}"
        )
    check_gqa(q.shape[1], k_cache.shape[1])
    if req_to_token.dtype != torch.int32 or req_to_token.dim() != 2:
        raise ValueError(f"req_to_token must be 2-D int32, got {req_to_token.dtype} "
                         f"{tuple(req_to_token.shape)}")
    check_unit_last_stride("req_to_token", req_to_token)
