"""Triton prefill and decode attention against the torch reference (CPU interpreter / CUDA)."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

from kernels import reference
from tests.kernels.conftest import IN_PROCESS_INTERPRETER
from tests.kernels.helpers import PoolBatch, assert_close, make_pool_batch

# (prefix_lens, new_lens, q_heads, kv_heads, head_dim): ragged, cached prefixes, GQA 1 / 3 / 8
PREFILL_CASES = [
    ([0], [1], 2, 2, 64),  # a single token, no prefix
    ([0, 17, 5], [19, 1, 33], 6, 2, 64),  # GQA 3, mixed prefix / no prefix, several M blocks
    ([40, 0], [7, 21], 8, 1, 128),  # GQA 8, long prefix, head_dim 128
    ([3, 0, 9, 1, 0], [5, 16, 2, 17, 3], 4, 4, 64),  # many requests, block-edge lengths
    ([45], [3], 8, 2, 64),  # GQA 4: a short chunk after a long prefix (split-K)
    ([15, 16, 31, 32], [1, 17, 16, 2], 3, 1, 64),  # GQA 3: prefixes on and off 16-key tile edges
    ([0, 64], [47, 5], 8, 1, 64),  # GQA 8: two tokens per 16-row block, many diagonal tiles
]
# (seq_lens, q_heads, kv_heads, head_dim); the interpreter uses 16-token tiles and splits
DECODE_CASES = [
    ([1], 2, 2, 64),  # one token
    ([70], 8, 1, 128),  # batch 1: many splits, several tiles per split
    ([2, 33, 100], 3, 1, 64),  # GQA 3; request of length 2 leaves empty splits
    ([5, 64, 17, 1, 49, 0], 6, 2, 64),  # many requests, an empty one gives zeros
    ([31, 48], 16, 2, 128),  # GQA 8
]


def _prefill(ops: SimpleNamespace, q: torch.Tensor, pb: PoolBatch, new_lens: list[int], scale: float):
    return ops.prefill_attention(q, pb.k_cache, pb.v_cache, pb.req_to_token, pb.slots, pb.prefix_lens,
                                 pb.cu_new_lens, max(new_lens), scale)


def _decode(ops: SimpleNamespace, q: torch.Tensor, pb: PoolBatch, scale: float):
    return ops.decode_attention(q, pb.k_cache, pb.v_cache, pb.req_to_token, pb.slots, pb.seq_lens, scale,
                                int(pb.seq_lens.max()))


@pytest.mark.parametrize(("prefix_lens", "new_lens", "q_heads", "kv_heads", "head_dim"), PREFILL_CASES)
def test_prefill_attention_fp32(tops: SimpleNamespace, device: torch.device, prefix_lens: list[int],
                                new_lens: list[int], q_heads: int, kv_heads: int, head_dim: int) -> None:
    pb = make_pool_batch(prefix_lens, new_lens, kv_heads, head_dim, torch.float32, device)
    q = torch.randn(sum(new_lens), q_heads, head_dim, device=device)
    scale = head_dim**-0.5
    out = _prefill(tops, q, pb, new_lens, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, _prefill(reference, q, pb, new_lens, scale), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prefill_attention_half(tops: SimpleNamespace, device: torch.device, dtype: torch.dtype) -> None:
    prefix_lens, new_lens = [0, 21], [18, 12]
    pb = make_pool_batch(prefix_lens, new_lens, 2, 64, dtype, device)
    q = torch.randn(sum(new_lens), 6, 64, dtype=dtype, device=device)
    out = _prefill(tops, q, pb, new_lens, 0.125)
    assert out.dtype == dtype
    assert_close(out, _prefill(reference, q, pb, new_lens, 0.125), dtype)


def test_prefill_attention_on_strided_q(tops: SimpleNamespace, device: torch.device) -> None:
    """q as a view of a fused qkv buffer, as the model passes it."""
    new_lens = [9, 4]
    pb = make_pool_batch([2, 0], new_lens, 1, 64, torch.float32, device)
    qkv = torch.randn(13, (3 + 2) * 64, device=device)
    q = qkv[:, : 3 * 64].view(13, 3, 64)
    out = _prefill(tops, q, pb, new_lens, 0.125)
    assert_close(out, _prefill(reference, q.contiguous(), pb, new_lens, 0.125), torch.float32)


@pytest.mark.parametrize(("seq_lens", "q_heads", "kv_heads", "head_dim"), DECODE_CASES)
def test_decode_attention_fp32(tops: SimpleNamespace, device: torch.device, seq_lens: list[int], q_heads: int,
                               kv_heads: int, head_dim: int) -> None:
    prefix_lens = [max(length - 1, 0) for length in seq_lens]
    new_lens = [min(length, 1) for length in seq_lens]
    pb = make_pool_batch(prefix_lens, new_lens, kv_heads, head_dim, torch.float32, device)
    q = torch.randn(len(seq_lens), q_heads, head_dim, device=device)
    scale = head_dim**-0.5
    out = _decode(tops, q, pb, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, _decode(reference, q, pb, scale), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_attention_half(tops: SimpleNamespace, device: torch.device, dtype: torch.dtype) -> None:
    seq_lens = [45, 3, 20]
    pb = make_pool_batch([s - 1 for s in seq_lens], [1, 1, 1], 1, 128, dtype, device)
    q = torch.randn(3, 8, 128, dtype=dtype, device=device)
    out = _decode(tops, q, pb, 128**-0.5)
    assert out.dtype == dtype
    assert_close(out, _decode(reference, q, pb, 128**-0.5), dtype)


def test_decode_padded_max_seq_len_is_harmless(tops: SimpleNamespace, device: torch.device) -> None:
    """A CUDA-graph caller passes a fixed, larger max_seq_len: more splits, same answer."""
    pb = make_pool_batch([10, 30], [1, 1], 2, 64, torch.float32, device)
    q = torch.randn(2, 4, 64, device=device)
    args = (q, pb.k_cache, pb.v_cache, pb.req_to_token, pb.slots, pb.seq_lens, 0.125)
    assert_close(tops.decode_attention(*args, 120), tops.decode_attention(*args, 31), torch.float32)


def test_decode_matches_last_prefill_row(tops: SimpleNamespace, device: torch.device) -> None:
    """Both Triton kernels agree where their jobs overlap: the last new token of each request."""
    new_lens = [6, 20]
    pb = make_pool_batch([25, 0], new_lens, 2, 64, torch.float32, device)
    q = torch.randn(26, 6, 64, device=device)
    prefill = _prefill(tops, q, pb, new_lens, 0.125)
    last = pb.cu_new_lens[1:].long() - 1
    assert_close(_decode(tops, q[last].contiguous(), pb, 0.125), prefill[last], torch.float32)


@pytest.mark.skipif(not IN_PROCESS_INTERPRETER, reason="needs the in-process interpreter copies")
def test_interpreter_splits_decode_work() -> None:
    """The CPU decode cases above really exercise several splits (the stage-2 merge)."""
    module = sys.modules["_interpreted_kernels.decode_attention"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        assert module._pick_num_splits(1, 1, 70, torch.device("cpu")) > 1
        assert module._pick_num_splits(3, 1, 100, torch.device("cpu")) == 3


def _prefill_module(ops: SimpleNamespace):
    return sys.modules[ops.prefill_attention.__module__]


class _GridRecorder:
    """Stands in for a @triton.jit kernel: records each launch grid, then launches."""

    def __init__(self, kernel) -> None:
        self.kernel, self.grids, self.constexprs = kernel, [], []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.grids.append(tuple(grid))
            self.constexprs.append(kwargs)
            return launch(*args, **kwargs)
        return run


@pytest.mark.parametrize("num_splits", [1, 2, 5])
def test_prefill_attention_at_forced_split_counts(tops: SimpleNamespace, device: torch.device,
                                                  num_splits: int) -> None:
    """Every split count gives the reference's answer (empty slices, slices past the diagonal)."""
    new_lens = [7, 2, 20]
    pb = make_pool_batch([37, 0, 5], new_lens, 2, 64, torch.float32, device)
    q = torch.randn(sum(new_lens), 6, 64, device=device)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_prefill_module(tops), "_pick_num_splits", lambda *args: num_splits)
        out = _prefill(tops, q, pb, new_lens, 0.125)
    assert_close(out, _prefill(reference, q, pb, new_lens, 0.125), torch.float32)


def test_prefill_reads_each_kv_head_once_per_token_block(tops: SimpleNamespace,
                                                         device: torch.device) -> None:
    """GQA heads share a program: the grid has one column per KV head (times key slices), not one
    per query head, and a short chunk after a long prefix is split along its keys."""
    module = _prefill_module(tops)
    recorder = _GridRecorder(module._prefill_attention_kernel)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "_prefill_attention_kernel", recorder)
        pb = make_pool_batch([0, 3, 9, 1, 0], [5, 16, 2, 17, 3], 2, 64, torch.float32, device)
        _prefill(tops, torch.randn(43, 8, 64, device=device), pb, [5, 16, 2, 17, 3], 0.125)
        pb = make_pool_batch([600], [2], 2, 64, torch.float32, device)  # >= 2 slices of 256 on GPU
        _prefill(tops, torch.randn(2, 8, 64, device=device), pb, [2], 0.125)
    (blocks, batch, columns), (_, _, split_columns) = recorder.grids
    assert batch == 5 and columns == 2  # 2 KV heads serve 8 query heads: 1 program, not 4
    rows = recorder.constexprs[0]["BLOCK_M"]
    assert blocks == -(-17 // (rows // 4))  # each block holds rows // group tokens x 4 heads
    assert split_columns > 2 and split_columns % 2 == 0  # 2 KV heads x several key slices
