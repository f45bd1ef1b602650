"""How many KV tokens fit on a CUDA device: measure the worst step, reserve, give the rest out.

The model runner (CUDA, no --kv-capacity-tokens) loads the weights, then:
1. runs the worst step the scheduler can plan (`worst_case_shape`: max_num_batched_tokens tokens,
   max_num_seqs rows all sampled with top-p over the whole vocab, penalties and top logprobs) on a
   scratch pool, and the largest decode bucket the CUDA graphs will capture, measuring each one's
   peak allocation above what stays resident (`measure_peak`);
2. empties the allocator's cache and reads the free memory (without the empty, freed activations
   still count as used while their peak is also subtracted: counted twice, pool too small);
3. subtracts what must stay free (`MemoryBudget`): the worst step's peak, what the captured graphs
   will hold (their decode activations plus every bucket's logits, allocated after the pool), the
   request->token table, and a fixed slack (allocator rounding, a second cuBLAS workspace for the
   capture stream, split-prefill partials);
4. gives `gpu_memory_utilization` of the rest to the pool.

Every call goes through a `DeviceMemory`, so the arithmetic is tested with a fake device.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

SLACK_BYTES = 512 << 20
LOGITS_ROUNDING = 2 << 20  # each bucket's logits are their own allocator block


class DeviceMemory(Protocol):
    """The allocator and driver calls the sizing needs (torch.cuda's, for one device)."""

    def synchronize(self) -> None: ...
    def empty_cache(self) -> None: ...
    def reset_peak_memory_stats(self) -> None: ...
    def memory_allocated(self) -> int: ...
    def max_memory_allocated(self) -> int: ...
    def mem_get_info(self) -> tuple[int, int]: ...


class CudaMemory:
    """DeviceMemory over torch.cuda for one device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    def reset_peak_memory_stats(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def memory_allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def max_memory_allocated(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)

    def mem_get_info(self) -> tuple[int, int]:
        return torch.cuda.mem_get_info(self.device)


def measure_peak(memory: DeviceMemory, run: Callable[[], object]) -> int:
    """Bytes `run` allocates at its peak above what was allocated before it (freed or not)."""
    memory.synchronize()
    memory.reset_peak_memory_stats()
    before = memory.memory_allocated()
    result = run()
    memory.synchronize()
    del result
    return max(memory.max_memory_allocated() - before, 0)


def worst_case_shape(max_num_seqs: int, max_num_batched_tokens: int,
                     max_model_len: int) -> tuple[int, list[int]]:
    """(decode rows, prefill chunk lengths) of the largest step the scheduler can plan: every
    token of the budget, every request slot a sampled row, chunks no longer than max_model_len."""
    tokens = min(max_num_batched_tokens, max_num_seqs * max_model_len)
    chunks = 1
    while tokens - (max_num_seqs - chunks) > chunks * max_model_len:
        chunks += 1
    decode = max(min(max_num_seqs - chunks, tokens - chunks), 0)
    prefill = tokens - decode
    lens = [prefill // chunks + (1 if i < prefill % chunks else 0) for i in range(chunks)]
    return decode, [n for n in lens if n > 0]


def graph_reserve_bytes(buckets: list[int], vocab_size: int, decode_peak: int) -> int:
    """What captured decode graphs hold: the largest bucket's activations (their private pool is
    reused by the smaller buckets) plus each bucket's fp32 logits, which stay allocated."""
    if not buckets:
        return 0
    logits = sum(-(-b * vocab_size * 4 // LOGITS_ROUNDING) * LOGITS_ROUNDING for b in buckets)
    return decode_peak + logits


@dataclass(slots=True)
class MemoryBudget:
    """The device memory picture the pool is sized from (bytes)."""

    total: int
    free: int            # free after the profile, allocator cache emptied
    step_peak: int       # worst step's peak allocation above resident memory
    graph_reserve: int   # captured CUDA graphs (0 without)
    table_bytes: int     # the request->token table, allocated with the pool
    slack: int = SLACK_BYTES

    @property
    def reserved(self) -> int:
        return self.step_peak + self.graph_reserve + self.table_bytes + self.slack

    def kv_tokens(self, bytes_per_token: int, utilization: float) -> int:
        """Pool tokens: utilization x (free - reserved) / bytes per token, less the scratch row."""
        available = max(self.free - self.reserved, 0)
        return max(int(available * utilization) // bytes_per_token - 1, 0)


def read_budget(memory: DeviceMemory, step_peak: int, graph_reserve: int,
                table_bytes: int) -> MemoryBudget:
    """Empty the allocator's cache, read free/total, and bundle the reserves."""
    memory.synchronize()
    memory.empty_cache()
    free, total = memory.mem_get_info()
    return MemoryBudget(total=total, free=free, step_peak=step_peak, graph_reserve=graph_reserve,
                        table_bytes=table_bytes)
