"""Triton rmsnorm, rope, silu_mul and store_kv against their torch twins (CPU interpreter / CUDA)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kernels import reference
from tests.kernels.helpers import assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "hidden"), [(1, 64), (5, 96), (3, 1000)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(tops: SimpleNamespace, device: torch.device, dtype: torch.dtype, tokens: int,
                  hidden: int, with_residual: bool) -> None:
    wide = torch.randn(tokens, hidden + 8, dtype=dtype, device=device)
    x = wide[:, 3 : 3 + hidden]  # rows with a stride wider than hidden
    weight = torch.randn(hidden, dtype=dtype, device=device)
    residual = torch.randn(tokens, hidden, dtype=dtype, device=device) if with_residual else None
    out, summed = tops.rms_norm(x, weight, 1e-6, residual)
    expected_out, expected_summed = reference.rms_norm(x, weight, 1e-6, residual)
    assert out.dtype == dtype and summed.dtype == dtype
    # exact, except that the interpreter rounds fp32 -> bf16 by truncation (GPUs round to nearest)
    bf16_interpreted = dtype == torch.bfloat16 and device.type == "cpu"
    torch.testing.assert_close(summed, expected_summed, atol=0, rtol=2**-7 if bf16_interpreted else 0)
    # both round the normalised row to dtype before the weight; at most one ulp apart
    assert_close(out, expected_out, dtype, scale=2.0 if dtype != torch.float32 else 1.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("q_heads", "kv_heads", "head_dim"), [(3, 3, 64), (6, 2, 128), (8, 1, 64)])
def test_apply_rope_on_fused_qkv_views(tops: SimpleNamespace, device: torch.device, dtype: torch.dtype,
                                       q_heads: int, kv_heads: int, head_dim: int) -> None:
    tokens = 5
    cos_sin = reference.build_rope_cache(head_dim, 64, 10000.0, None, device)
    qkv = torch.randn(tokens, (q_heads + 2 * kv_heads) * head_dim, dtype=dtype, device=device)
    q = qkv[:, : q_heads * head_dim].view(tokens, q_heads, head_dim)  # strided views, like the model's
    k = qkv[:, q_heads * head_dim : (q_heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v_before = qkv[:, (q_heads + kv_heads) * head_dim :].clone()
    q_ref, k_ref = q.clone(), k.clone()
    positions = torch.tensor([7, 0, 63, 2, 7], device=device)
    tops.apply_rope(q, k, positions, cos_sin)
    reference.apply_rope(q_ref, k_ref, positions, cos_sin)
    assert_close(q, q_ref, dtype)
    assert_close(k, k_ref, dtype)
    torch.testing.assert_close(qkv[:, (q_heads + kv_heads) * head_dim :], v_before, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "inter"), [(1, 16), (4, 100), (2, 1500)])
def test_silu_and_mul(tops: SimpleNamespace, device: torch.device, dtype: torch.dtype, tokens: int,
                      inter: int) -> None:
    x = torch.randn(tokens, 2 * inter, dtype=dtype, device=device) * 4
    out = tops.silu_and_mul(x)
    assert out.shape == (tokens, inter) and out.dtype == dtype
    assert_close(out, reference.silu_and_mul(x), dtype)


STORE_DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)]


@pytest.mark.parametrize(("cache_dtype", "new_dtype"), STORE_DTYPES)
@pytest.mark.parametrize(("kv_heads", "head_dim"), [(1, 128), (3, 64)])
def test_store_kv_scatters_into_shared_pool(tops: SimpleNamespace, device: torch.device, cache_dtype: torch.dtype,
                                            new_dtype: torch.dtype, kv_heads: int, head_dim: int) -> None:
    capacity, tokens = 40, 6
    pool = torch.randn(capacity, 2 * kv_heads, head_dim, dtype=cache_dtype, device=device)
    k_cache, v_cache = pool[:, :kv_heads], pool[:, kv_heads:]  # K and V interleaved in one buffer
    expected_pool = pool.clone()
    kv = torch.randn(tokens, 2 * kv_heads, head_dim, dtype=new_dtype, device=device)
    k, v = kv[:, :kv_heads], kv[:, kv_heads:]  # strided views
    rows = torch.randperm(capacity, device=device)[:tokens]
    tops.store_kv(k_cache, v_cache, k, v, rows)
    reference.store_kv(expected_pool[:, :kv_heads], expected_pool[:, kv_heads:], k, v, rows)
    torch.testing.assert_close(pool, expected_pool, atol=0, rtol=0)


def test_store_kv_accepts_int32_rows(tops: SimpleNamespace, device: torch.device) -> None:
    k_cache = torch.zeros(9, 2, 64, device=device)
    v_cache = torch.zeros(9, 2, 64, device=device)
    k, v = torch.randn(2, 2, 64, device=device), torch.randn(2, 2, 64, device=device)
    tops.store_kv(k_cache, v_cache, k, v, torch.tensor([8, 1], dtype=torch.int32, device=device))
    torch.testing.assert_close(k_cache[8], k[0])
    torch.testing.assert_close(v_cache[1], v[1])
    assert k_cache.abs().sum(dim=(1, 2)).nonzero().flatten().tolist() == [1, 8]
