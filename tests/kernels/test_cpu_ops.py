"""The CPU serving ops (kernels.cpu.ops) against the reference twins and naive loops."""

from __future__ import annotations

import pytest
import torch

from kernels import reference
from kernels.cpu import native as cpu_native
from kernels.cpu import ops as cpu_ops
from tests.kernels.helpers import assert_close, make_pool_batch, naive_decode, naive_prefill

CPU = torch.device("cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_on_strided_views_matches_reference(dtype: torch.dtype) -> None:
    """q and k are views of one fused qkv tensor; the rotation lands in place, v untouched."""
    torch.manual_seed(0)
    tokens, q_heads, kv_heads, head_dim = 9, 6, 2, 32
    width = (q_heads + 2 * kv_heads) * head_dim
    qkv = torch.randn(tokens, width, dtype=dtype)
    original = qkv.clone()
    q = qkv[:, :q_heads * head_dim].view(tokens, q_heads, head_dim)
    k = qkv[:, q_heads * head_dim:(q_heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    positions = torch.tensor([0, 1, 2, 7, 100, 5, 63, 64, 1000])
    table = reference.build_rope_cache(head_dim, 1024, 10000.0, None, CPU)
    q_ref = q.clone()
    k_ref = k.clone()
    reference.apply_rope(q_ref, k_ref, positions, table)
    cpu_ops.apply_rope(q, k, positions, table)
    exact = dtype == torch.float32
    torch.testing.assert_close(q, q_ref, atol=1e-6 if exact else 3e-2, rtol=1e-6 if exact else 2e-2)
    torch.testing.assert_close(k, k_ref, atol=1e-6 if exact else 3e-2, rtol=1e-6 if exact else 2e-2)
    v_cols = slice((q_heads + kv_heads) * head_dim, width)
    assert torch.equal(qkv[:, v_cols], original[:, v_cols])
    assert not torch.equal(qkv[1:, :head_dim], original[1:, :head_dim])  # it did rotate


def test_rope_in_bf16_rounds_like_transformers() -> None:
    """A bf16 model rotates in bf16: q*cos + rotate_half(q)*sin, each product rounded."""
    torch.manual_seed(1)
    q = torch.randn(5, 3, 16, dtype=torch.bfloat16)
    k = torch.randn(5, 1, 16, dtype=torch.bfloat16)
    positions = torch.tensor([3, 9, 27, 81, 243])
    table = reference.build_rope_cache(16, 256, 10000.0, None, CPU)
    cos = table[positions, None, :8].to(torch.bfloat16).repeat(1, 1, 2)
    sin = table[positions, None, 8:].to(torch.bfloat16).repeat(1, 1, 2)

    def hf_style(x: torch.Tensor) -> torch.Tensor:
        rotated = torch.cat((-x[..., 8:], x[..., :8]), dim=-1)
        return x * cos + rotated * sin

    q_expected, k_expected = hf_style(q), hf_style(k)
    cpu_ops.apply_rope(q, k, positions, table)
    assert torch.equal(q, q_expected) and torch.equal(k, k_expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_matches_reference(dtype: torch.dtype) -> None:
    x = torch.randn(7, 2 * 40, dtype=dtype) * 4
    expected = reference.silu_and_mul(x)
    actual = cpu_ops.silu_and_mul(x)
    assert actual.dtype == dtype and actual.shape == (7, 40)
    if dtype == torch.float32:
        torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-6)
    else:
        torch.testing.assert_close(actual, expected, atol=6e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("q_heads", "kv_heads"), [(4, 4), (6, 2), (8, 1)])
def test_decode_attention_matches_naive(dtype: torch.dtype, q_heads: int, kv_heads: int) -> None:
    torch.manual_seed(2)
    pb = make_pool_batch([0] * 5, [1, 7, 33, 2, 60], kv_heads, 32, dtype, CPU)
    q = torch.randn(5, q_heads, 32, dtype=dtype)
    out = cpu_ops.decode_attention(q, pb.k_cache, pb.v_cache, pb.req_to_token, pb.slots,
                                   pb.seq_lens, 32 ** -0.5, 64)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, naive_decode(q, pb, 32 ** -0.5), dtype)
    ref = reference.decode_attention(q, pb.k_cache, pb.v_cache, pb.req_to_token, pb.slots,
                                     pb.seq_lens, 32 ** -0.5, 64)
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("native", [True, False])
def test_decode_attention_gives_zeros_for_empty_requests_and_checks_width(
        native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDPA path pads to max_seq_len, so one below the longest seq_len is an error there;
    the C kernel reads exactly seq_lens keys and gives the right answer regardless."""
    if not native:
        monkeypatch.setitem(cpu_native._state, "lib", None)
    elif cpu_native.load() is None:
        pytest.skip("no C compiler here")
    pb = make_pool_batch([0, 0], [3, 4], 2, 16, torch.bfloat16, CPU)
    seq_lens = torch.tensor([0, 4], dtype=torch.int32)
    q = torch.randn(2, 4, 16, dtype=torch.bfloat16)
    out = cpu_ops.decode_attention(q, pb.k_cache, pb.v_cache, pb.req_to_token, pb.slots,
                                   seq_lens, 0.25, 4)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and not torch.isnan(out).any()
    if native:
        short = cpu_ops.decode_attention(q, pb.k_cache, pb.v_cache, pb.req_to_token, pb.slots,
                                         seq_lens, 0.25, 3)
        assert torch.equal(short, out)
        return
    with pytest.raises(ValueError, match="max_seq_len"):
        cpu_ops.decode_attention(q, pb.k_cache, pb.v_cache, pb.req_to_token, pb.slots,
                                 seq_lens, 0.25, 3)


PREFILL_CASES = {
    "no_prefix_similar": ([0, 0, 0, 0], [5, 9, 1, 12]),
    "prefixes": ([3, 0, 17, 1], [4, 11, 6, 1]),
    "one_long_alone": ([0, 5, 0], [300, 7, 20]),
    "long_with_prefix": ([40], [280]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(PREFILL_CASES))
def test_prefill_attention_matches_naive(dtype: torch.dtype, case: str) -> None:
    torch.manual_seed(3)
    prefix_lens, new_lens = PREFILL_CASES[case]
    pb = make_pool_batch(prefix_lens, new_lens, 2, 32, dtype, CPU)
    q = torch.randn(sum(new_lens), 6, 32, dtype=dtype)
    out = cpu_ops.prefill_attention(q, pb.k_cache, pb.v_cache, pb.req_to_token, pb.slots,
                                    pb.prefix_lens, pb.cu_new_lens, max(new_lens), 32 ** -0.5)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, naive_prefill(q, pb, 32 ** -0.5), dtype)


def test_prefill_groups_respect_the_score_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a small cap the chunks split into several groups; the answer does not change."""
    chunks = [(0, 10, 0, 0), (10, 12, 4, 1), (22, 3, 0, 2), (25, 300, 0, 3), (325, 11, 0, 4)]
    groups = cpu_ops._groups(chunks, q_heads=4)
    assert [len(g) for g in groups] == [1, 4]   # the 300-token chunk alone, then the rest
    monkeypatch.setattr(cpu_ops, "GROUP_MAX_SCORES", 4 * 12 * 16 * 2)
    small = cpu_ops._groups(chunks, q_heads=4)
    assert sorted(c for g in small for c in g) == sorted(chunks)
    for group in small:
        if len(group) > 1:
            max_new = max(c[1] for c in group)
            max_ctx = max(c[1] + c[2] for c in group)
            assert len(group) * 4 * max_new * max_ctx <= cpu_ops.GROUP_MAX_SCORES
    assert len(small) > len(groups)
    torch.manual_seed(4)
    pb = make_pool_batch([0, 4, 0, 2, 0], [10, 12, 3, 9, 11], 2, 16, torch.bfloat16, CPU)
    q = torch.randn(45, 4, 16, dtype=torch.bfloat16)
    out = cpu_ops.prefill_attention(q, pb.k_cache, pb.v_cache, pb.req_to_token, pb.slots,
                                    pb.prefix_lens, pb.cu_new_lens, 12, 0.25)
    assert_close(out, naive_prefill(q, pb, 0.25), torch.bfloat16)


def test_fp32_prefill_is_exactly_one_sdpa_per_chunk() -> None:
    """fp32 (the parity mode) must not depend on which chunks share a step."""
    torch.manual_seed(5)
    pb = make_pool_batch([0, 0, 3], [9, 14, 6], 2, 16, torch.float32, CPU)
    q = torch.randn(29, 4, 16)
    together = cpu_ops.prefill_attention(q, pb.k_cache, pb.v_cache, pb.req_to_token, pb.slots,
                                         pb.prefix_lens, pb.cu_new_lens, 14, 0.25)
    for b in range(3):
        start, end = int(pb.cu_new_lens[b]), int(pb.cu_new_lens[b + 1])
        alone = cpu_ops.prefill_attention(q[start:end], pb.k_cache, pb.v_cache, pb.req_to_token,
                                          pb.slots[b:b + 1], pb.prefix_lens[b:b + 1],
                                          torch.tensor([0, end - start], dtype=torch.int32),
                                          end - start, 0.25)
        assert torch.equal(together[start:end], alone)
