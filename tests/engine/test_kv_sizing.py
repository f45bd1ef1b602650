"""KV pool sizing on CUDA, tested with a fake device whose allocator caches freed blocks like
torch's: the worst step's peak is counted once, the profiled step is the scheduler's worst
(max_num_seqs sampled rows, the whole token budget, top-p over the vocabulary), and what the
CUDA graphs, their logits and the request->token table take after sizing is reserved first.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from engine_svc.cuda_graphs import batch_buckets
from engine_svc.device_setup import CAPTURE
from engine_svc.kv_sizing import (SLACK_BYTES, MemoryBudget, graph_reserve_bytes, measure_peak,
                                  read_budget, worst_case_shape)
from engine_svc.model_runner import ModelRunner
from engine_svc.params import MAX_TOP_LOGPROBS
from engine_svc.profile_step import profile_worst_step
from tests.engine.helpers import make_engine

GiB = 2**30


class FakeDevice:
    """A device whose allocator keeps freed blocks cached until empty_cache (as torch's does)."""

    def __init__(self, total: int, outside_torch: int) -> None:
        self.total, self.outside = total, outside_torch
        self.allocated = self.reserved = self.peak = 0

    def alloc(self, nbytes: int) -> None:
        self.allocated += nbytes
        self.reserved = max(self.reserved, self.allocated)
        self.peak = max(self.peak, self.allocated)

    def free(self, nbytes: int) -> None:
        self.allocated -= nbytes   # stays reserved (cached)

    def synchronize(self) -> None:
        pass

    def empty_cache(self) -> None:
        self.reserved = self.allocated

    def reset_peak_memory_stats(self) -> None:
        self.peak = self.allocated

    def memory_allocated(self) -> int:
        return self.allocated

    def max_memory_allocated(self) -> int:
        return self.peak

    def mem_get_info(self) -> tuple[int, int]:
        return self.total - self.outside - self.reserved, self.total


def _step(device: FakeDevice, activations: int, logits: int):
    def run():
        device.alloc(activations)
        device.alloc(logits)
        device.free(activations)   # logits outlive the forward, then go too
        device.free(logits)
    return run


def test_freed_activations_are_not_counted_twice():
    device = FakeDevice(total=80 * GiB, outside_torch=GiB // 2)
    device.alloc(10 * GiB)                       # weights
    peak = measure_peak(device, _step(device, 6 * GiB, GiB))
    assert peak == 7 * GiB
    assert device.mem_get_info()[0] == 80 * GiB - GiB // 2 - 17 * GiB   # the cache still holds 7
    budget = read_budget(device, peak, graph_reserve=2 * GiB, table_bytes=GiB // 4)
    assert budget.free == 80 * GiB - GiB // 2 - 10 * GiB            # cache emptied first
    bytes_per_token = 128 * 1024
    expected = int((budget.free - 7 * GiB - 2 * GiB - GiB // 4 - SLACK_BYTES) * 0.9) // bytes_per_token - 1
    assert budget.kv_tokens(bytes_per_token, 0.9) == expected
    # the peak is counted once: a step at its peak leaves exactly free - step_peak (reading free
    # with the 7 GiB still cached and subtracting the peak again would count it twice)
    assert budget.free - budget.step_peak == device.total - device.outside - 10 * GiB - 7 * GiB


@pytest.mark.parametrize(("seqs", "tokens", "max_len"), [(256, 8192, 4096), (4, 64, 128), (1, 2048, 4096),
                                                         (8, 8, 64), (64, 2048, 16), (3, 100, 40)])
def test_worst_case_shape_fills_every_row_and_the_token_budget(seqs, tokens, max_len):
    decode, prefill = worst_case_shape(seqs, tokens, max_len)
    assert decode + sum(prefill) == min(tokens, seqs * max_len)
    assert decode + len(prefill) == seqs or sum(prefill) == 0
    assert all(0 < n <= max_len for n in prefill)


def test_graph_reserve_holds_every_buckets_logits_and_one_decode_peak():
    buckets = batch_buckets(256)
    reserve = graph_reserve_bytes(buckets, vocab_size=128256, decode_peak=GiB)
    logits = sum(b * 128256 * 4 for b in buckets)
    assert GiB + logits <= reserve <= GiB + logits + len(buckets) * (2 << 20)
    assert graph_reserve_bytes([], 128256, GiB) == 0


def test_runner_reserves_graphs_logits_and_table_before_sizing():
    """ModelRunner's own plumbing (fake device): graph buckets and logits width from the model,
    the table's bytes, utilization of what is left."""
    device = FakeDevice(total=40 * GiB, outside_torch=GiB)
    device.alloc(4 * GiB)
    config = SimpleNamespace(max_num_seqs=64, gpu_memory_utilization=0.8)
    lm_head = torch.empty(32000, 1)
    runner = SimpleNamespace(config=config, graph_mode=CAPTURE, max_model_len=8192,
                             model=SimpleNamespace(weights=SimpleNamespace(lm_head=lm_head)),
                             kv_bytes_per_token=lambda: 64 * 1024, memory_budget=None)
    tokens = ModelRunner._capacity_from_memory(runner, 3 * GiB, GiB // 2, memory=device)
    budget = runner.memory_budget
    assert budget.table_bytes == 65 * 8192 * 4
    assert budget.graph_reserve == graph_reserve_bytes(batch_buckets(64), 32000, GiB // 2)
    free = 35 * GiB
    assert tokens == int((free - 3 * GiB - budget.graph_reserve - budget.table_bytes - SLACK_BYTES)
                         * 0.8) // (64 * 1024) - 1
    runner.graph_mode = None   # no graphs: nothing reserved for them, a larger pool
    assert ModelRunner._capacity_from_memory(runner, 3 * GiB, GiB // 2, memory=device) > tokens
    with pytest.raises(ValueError, match="fewer than max_model_len"):
        ModelRunner._capacity_from_memory(runner, 34 * GiB, 0, memory=device)


def test_budget_reserved_sums_its_parts():
    budget = MemoryBudget(total=10, free=9, step_peak=1, graph_reserve=2, table_bytes=3, slack=4)
    assert budget.reserved == 10 and budget.kv_tokens(1, 1.0) == 0


def test_profiled_step_is_the_worst_the_scheduler_can_plan(tiny_model_dir):
    """On the real runner (CPU): max_num_seqs rows sampled with top-p over the whole vocabulary,
    penalties and top logprobs, max_num_batched_tokens tokens, on a scratch pool."""
    engine = make_engine(tiny_model_dir, max_num_seqs=6, max_num_batched_tokens=40,
                         max_model_len=32, kv_capacity_tokens=256)
    runner = engine.runner
    seen = {}
    forward, sampler = runner.model.forward, runner.sampler

    def spy_forward(batch, cache):
        seen["tokens"], seen["cache"] = batch.input_ids.numel(), cache
        return forward(batch, cache)

    def spy_sampler(logits, params, *args, **kwargs):
        seen["rows"], seen["params"] = logits.shape[0], params
        return sampler(logits, params, *args, **kwargs)

    runner.model.forward, runner.sampler = spy_forward, spy_sampler
    table, cache = runner.table, runner.cache
    profile_worst_step(runner, measure=False)
    assert seen["tokens"] == 40 and seen["rows"] == 6
    assert seen["cache"] is not cache and runner.table is table and runner.cache is cache
    assert all(p.top_p < 1.0 and p.top_k == 0 and p.repetition_penalty != 1.0
               and p.top_logprobs == MAX_TOP_LOGPROBS for p in seen["params"])


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from tests.conftest import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny"), num_kv_heads=2, seed=7)
