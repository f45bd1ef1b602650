"""The torch reference ops against transformers' Llama code and naive loops."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from kernels import reference
from tests.kernels.helpers import assert_close, make_pool_batch, naive_decode, naive_prefill

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from transformers import LlamaConfig  # noqa: E402
from transformers.models.llama.modeling_llama import (  # noqa: E402
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,  # small, so test positions cross all three bands
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_llama_rmsnorm(dtype: torch.dtype) -> None:
    hf = LlamaRMSNorm(48, eps=1e-5).to(dtype)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(48))
    x = torch.randn(7, 48, dtype=dtype)
    residual = torch.randn(7, 48, dtype=dtype)
    out, summed = reference.rms_norm(x, hf.weight.detach(), 1e-5, residual)
    torch.testing.assert_close(summed, x + residual, atol=0, rtol=0)
    torch.testing.assert_close(out, hf(x + residual).detach(), atol=0, rtol=0)
    plain, same_x = reference.rms_norm(x, hf.weight.detach(), 1e-5)
    assert same_x is x
    torch.testing.assert_close(plain, hf(x).detach(), atol=0, rtol=0)


@pytest.mark.parametrize(
    ("scaling", "theta"),
    [(None, 10000.0), (LLAMA3_SCALING, 500000.0), ({"rope_type": "linear", "factor": 4.0}, 10000.0)],
    ids=["default", "llama3", "linear"],
)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rope_matches_llama_rotary_embedding(scaling: dict | None, theta: float, head_dim: int) -> None:
    rope_parameters = {"rope_type": "default", "rope_theta": theta}
    if scaling is not None:
        rope_parameters = {**scaling, "rope_theta": theta}
    config = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                         max_position_embeddings=4096, rope_parameters=rope_parameters)
    positions = torch.tensor([0, 1, 5, 63, 64, 200, 1023, 4095, 17])
    tokens = positions.shape[0]
    q = torch.randn(tokens, 4, head_dim)
    k = torch.randn(tokens, 2, head_dim)
    cos, sin = LlamaRotaryEmbedding(config)(q, positions[None])  # [1, tokens, head_dim]
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)

    cos_sin = reference.build_rope_cache(head_dim, 4096, theta, scaling, "cpu")
    assert cos_sin.shape == (4096, head_dim) and cos_sin.dtype == torch.float32
    torch.testing.assert_close(cos_sin[positions, : head_dim // 2], cos[0, :, : head_dim // 2])
    torch.testing.assert_close(cos_sin[positions, head_dim // 2 :], sin[0, :, : head_dim // 2])
    reference.apply_rope(q, k, positions, cos_sin)
    torch.testing.assert_close(q, q_hf[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, k_hf[0].transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_llama3_scaling_changes_only_low_frequencies() -> None:
    plain = reference.build_rope_cache(64, 300, 500000.0, None, "cpu")
    scaled = reference.build_rope_cache(64, 300, 500000.0, LLAMA3_SCALING, "cpu")
    torch.testing.assert_close(scaled[:, 0], plain[:, 0])  # fastest wave: untouched
    # slowest wave (sin column, small angles): its angle is divided by `factor`
    torch.testing.assert_close(torch.asin(scaled[1:, -1]) * 8.0, torch.asin(plain[1:, -1]), rtol=1e-3, atol=0)


def test_rope_cache_rejects_unknown_scaling() -> None:
    with pytest.raises(ValueError, match="rope_type"):
        reference.build_rope_cache(64, 16, 10000.0, {"rope_type": "yarn", "factor": 2.0}, "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_silu_and_mul(dtype: torch.dtype) -> None:
    x = torch.randn(5, 2 * 33, dtype=dtype)
    expected = F.silu(x[:, :33].double()) * x[:, 33:].double()
    out = reference.silu_and_mul(x)
    assert out.shape == (5, 33) and out.dtype == dtype
    assert_close(out, expected, dtype)


def test_store_kv_writes_only_given_rows() -> None:
    k_cache = torch.zeros(10, 2, 16)
    v_cache = torch.zeros(10, 2, 16)
    k, v = torch.randn(3, 2, 16), torch.randn(3, 2, 16)
    rows = torch.tensor([7, 2, 5])
    reference.store_kv(k_cache, v_cache, k, v, rows)
    torch.testing.assert_close(k_cache[rows], k)
    torch.testing.assert_close(v_cache[rows], v)
    untouched = torch.tensor([0, 1, 3, 4, 6, 8, 9])
    assert not k_cache[untouched].any() and not v_cache[untouched].any()


@pytest.mark.parametrize(("q_heads", "kv_heads"), [(4, 4), (6, 2), (8, 1)])
def test_prefill_attention_matches_naive_loop(q_heads: int, kv_heads: int) -> None:
    pb = make_pool_batch([0, 9, 3], [6, 1, 11], kv_heads, 16, torch.float32, torch.device("cpu"))
    q = torch.randn(int(pb.cu_new_lens[-1]), q_heads, 16)
    out = reference.prefill_attention(q, pb.k_cache, pb.v_cache, pb.req_to_token, pb.slots,
                                      pb.prefix_lens, pb.cu_new_lens, 11, 0.25)
    assert_close(out, naive_prefill(q, pb, 0.25), torch.float32)


def test_prefill_without_prefix_matches_contiguous_causal_sdpa() -> None:
    pb = make_pool_batch([0], [13], 2, 32, torch.float32, torch.device("cpu"))
    q = torch.randn(13, 6, 32)
    out = reference.prefill_attention(q, pb.k_cache, pb.v_cache, pb.req_to_token, pb.slots,
                                      pb.prefix_lens, pb.cu_new_lens, 13, 0.2)
    rows = pb.req_to_token[int(pb.slots[0]), :13].long()
    keys = pb.k_cache[rows].transpose(0, 1).repeat_interleave(3, dim=0)  # [6, 13, 32]
    values = pb.v_cache[rows].transpose(0, 1).repeat_interleave(3, dim=0)
    expected = F.scaled_dot_product_attention(q.transpose(0, 1), keys, values, is_causal=True, scale=0.2)
    assert_close(out, expected.transpose(0, 1), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_matches_naive_loop(dtype: torch.dtype) -> None:
    seq_lens = [1, 17, 0, 40]
    pb = make_pool_batch([s - 1 if s else 0 for s in seq_lens], [1 if s else 0 for s in seq_lens],
                         2, 16, dtype, torch.device("cpu"))
    q = torch.randn(4, 6, 16, dtype=dtype)
    out = reference.decode_attention(q, pb.k_cache, pb.v_cache, pb.req_to_token, pb.slots,
                                     pb.seq_lens, 0.25, 40)
    assert out.dtype == dtype
    assert_close(out, naive_decode(q, pb, 0.25), dtype)


def test_decode_equals_last_prefill_token() -> None:
    pb = make_pool_batch([4, 0], [7, 12], 1, 16, torch.float32, torch.device("cpu"))
    q = torch.randn(19, 8, 16)
    prefill = reference.prefill_attention(q, pb.k_cache, pb.v_cache, pb.req_to_token, pb.slots,
                                          pb.prefix_lens, pb.cu_new_lens, 12, 0.3)
    last = pb.cu_new_lens[1:].long() - 1
    decode = reference.decode_attention(q[last], pb.k_cache, pb.v_cache, pb.req_to_token, pb.slots,
                                        pb.seq_lens, 0.3, 12)
    torch.testing.assert_close(decode, prefill[last], atol=1e-5, rtol=1e-5)


def test_decode_rejects_max_seq_len_below_a_seq_len() -> None:
    pb = make_pool_batch([9], [1], 1, 16, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="max_seq_len"):
        reference.decode_attention(torch.randn(1, 2, 16), pb.k_cache, pb.v_cache, pb.req_to_token, pb.slots,
                                   pb.seq_lens, 0.25, 5)
