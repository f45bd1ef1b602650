"""The row-block prefill path of kernels/cpu/csrc/prefill_blocks.c (bf16 pool, AVX512-BF16,
head_dim 64/128, groups 1-8): runs of >= 4 consecutive tokens of one request, their query rows
in vector lanes, an online softmax over key tiles. Checked against float64 attention, against
the per-token path (LLMSERVE_CPU_PREFILL_BLOCKS=0), mixed with decode tokens as the C layer
loop passes them, and for a row's independence of how its prompt was chunked."""
from __future__ import annotations

import pytest
import torch

from kernels.cpu import native as cpu_native
from kernels.cpu import ops as cpu_ops
from tests.kernels.helpers import assert_close, make_pool_batch, naive_attention_one

LIB = cpu_native.load()


# gemm_bf16_available: the library was built with AVX512-BF16, as the row-block path needs
pytestmark = pytest.mark.skipif(LIB is None or not LIB.gemm_bf16_available(),
                                reason="the row-block path needs the C kernels and AVX512-BF16")
SHAPES = [(9, 3, 64), (8, 1, 128), (4, 4, 64), (16, 2, 128), (6, 2, 64)]   # q, kv heads, d


def _queries(tokens: int, q_heads: int, head_dim: int) -> torch.Tensor:
    """bf16 q as the model has it: a strided view of a fused qkv row."""
    qkv = torch.randn(tokens, (q_heads + 4) * head_dim).bfloat16()
    return qkv[:, :q_heads * head_dim].view(tokens, q_heads, head_dim)


def _naive_tokens(q: torch.Tensor, pb, slots: list[int], seq_lens: list[int],
                  scale: float) -> torch.Tensor:
    out = torch.zeros(q.shape, dtype=torch.float64)
    for t, (slot, length) in enumerate(zip(slots, seq_lens)):
        rows = pb.req_to_token[slot, :length].long()
        out[t] = naive_attention_one(q[t], pb.k_cache[rows], pb.v_cache[rows], scale)
    return out


def _prefill(q: torch.Tensor, pb, scale: float) -> torch.Tensor:
    return cpu_ops.prefill_attention(q, pb.k_cache, pb.v_cache, pb.req_to_token, pb.slots,
                                     pb.prefix_lens, pb.cu_new_lens, int(pb.new_lens.max()),
                                     scale)


@pytest.mark.parametrize(("q_heads", "kv_heads", "head_dim"), SHAPES)
def test_row_blocks_match_float64_and_differ_from_the_per_token_path(
        q_heads: int, kv_heads: int, head_dim: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs of 4 (the shortest blocked), 3 (per token), 50 and 97 tokens (several blocks, a
    partial last one, tiles of keys past 64), with and without prefixes."""
    torch.manual_seed(11)
    pb = make_pool_batch([0, 5, 37, 0], [4, 50, 97, 3], kv_heads, head_dim, torch.bfloat16,
                         torch.device("cpu"))
    q = _queries(154, q_heads, head_dim)
    scale = head_dim ** -0.5
    slots, lens = cpu_ops.per_token_queries(pb.slots, pb.prefix_lens, pb.cu_new_lens, 154)
    expected = _naive_tokens(q, pb, slots.tolist(), lens.tolist(), scale)
    blocked = _prefill(q, pb, scale)
    assert blocked.dtype == torch.bfloat16 and blocked.shape == q.shape
    assert_close(blocked, expected, torch.bfloat16)
    monkeypatch.setenv("LLMSERVE_CPU_PREFILL_BLOCKS", "0")
    per_token = _prefill(q, pb, scale)
    assert_close(per_token, expected, torch.bfloat16)
    # the blocked runs round differently (online softmax, bf16 probabilities): the path ran
    assert not torch.equal(blocked[:151], per_token[:151])
    # the 3-token run took the per-token path either way
    assert torch.equal(blocked[151:], per_token[151:])


def test_mixed_decode_and_prefill_tokens_in_one_call() -> None:
    """The C layer loop passes decode tokens (one per request) then prefill chunks at once."""
    torch.manual_seed(12)
    pb = make_pool_batch([30, 7, 0, 12], [1, 1, 40, 21], 3, 64, torch.bfloat16,
                         torch.device("cpu"))
    q = _queries(63, 9, 64)
    slots, lens = cpu_ops.per_token_queries(pb.slots, pb.prefix_lens, pb.cu_new_lens, 63)
    out = cpu_native.pool_attention(LIB, q, pb.k_cache, pb.v_cache, pb.req_to_token, slots,
                                    lens, 0.125)
    assert_close(out, _naive_tokens(q, pb, slots.tolist(), lens.tolist(), 0.125), torch.bfloat16)


@pytest.mark.parametrize("cuts", [[20], [4, 31], [16, 32, 48]])
def test_a_rows_result_does_not_depend_on_the_chunking(cuts: list[int]) -> None:
    """Prefilling 64 tokens at once or in chunks (each after the cached ones) gives the same
    bits per token: a row never depends on the rows it shares a block with."""
    torch.manual_seed(13)
    pb = make_pool_batch([0], [64], 3, 64, torch.bfloat16, torch.device("cpu"))
    q = _queries(64, 9, 64)
    whole = _prefill(q, pb, 0.125)
    bounds = [0, *cuts, 64]
    for start, end in zip(bounds, bounds[1:]):
        part = cpu_ops.prefill_attention(
            q[start:end], pb.k_cache, pb.v_cache, pb.req_to_token, pb.slots,
            torch.tensor([start], dtype=torch.int32),
            torch.tensor([0, end - start], dtype=torch.int32), end - start, 0.125)
        assert torch.equal(part, whole[start:end]), (start, end)


def test_large_and_tied_scores_stay_finite_and_exact_enough() -> None:
    """Scores tens apart (the running max jumps between key tiles) and all-equal scores."""
    torch.manual_seed(14)
    pb = make_pool_batch([0], [150], 1, 64, torch.bfloat16, torch.device("cpu"))
    pb.k_cache.mul_(30.0)
    q = _queries(150, 2, 64) * 30.0
    slots, lens = cpu_ops.per_token_queries(pb.slots, pb.prefix_lens, pb.cu_new_lens, 150)
    out = _prefill(q, pb, 0.125)
    assert torch.isfinite(out.float()).all()
    assert_close(out, _naive_tokens(q, pb, slots.tolist(), lens.tolist(), 0.125), torch.bfloat16)
    pb.k_cache.zero_()
    out = _prefill(q, pb, 0.125)
    assert_close(out, _naive_tokens(q, pb, slots.tolist(), lens.tolist(), 0.125), torch.bfloat16)
