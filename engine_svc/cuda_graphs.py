"""Decode steps replayed as CUDA graphs, one graph per batch-size bucket.

A decode batch of n requests runs in the smallest bucket >= n. The step's index tensors are
copied into static buffers; the rows past n are padding that reads and writes only a scratch
pool row through a dummy request->token slot (both owned by `ReqToTokenTable`), so they never
touch real K/V. The sequence lengths live in a static tensor refreshed before every replay;
decode attention reads them on the device and is launched with a fixed `max_seq_len`
(= max_model_len), so one graph serves every length.

With `capture=False` (CPU, or `--no-cuda-graphs` kept for testing) the same padded static
path runs eagerly, which is how the padding logic is tested without a GPU.
"""
from __future__ import annotations

import bisect
import logging

import torch

from engine_svc.forward_batch import ForwardBatch, KVCache
from engine_svc.models.llama import LlamaModel
from engine_svc.req_to_token import ReqToTokenTable

log = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 64, then every 32: sorted, capped at max_batch."""
    sizes = {1, 2, 4, 8, *range(16, 65, 8), *range(96, max_batch + 1, 32), max_batch}
    return sorted(s for s in sizes if s <= max_batch)


class DecodeGraphs:
    """Static buffers + one captured decode forward per bucket."""

    def __init__(self, model: LlamaModel, cache: KVCache, table: ReqToTokenTable,
                 capture: bool) -> None:
        """cache.req_to_token is table.tensor; batches go up to table.max_num_seqs requests."""
        self.model = model
        self.cache = cache
        self.buckets = batch_buckets(table.max_num_seqs)
        self.max_model_len = table.max_model_len
        self.capture = capture
        self.table = table
        device = table.tensor.device
        size = self.buckets[-1]
        self.input_ids = torch.zeros(size, dtype=torch.int64, device=device)      # [bucket]
        self.positions = torch.zeros(size, dtype=torch.int64, device=device)      # [bucket]
        self.out_rows = torch.full((size,), table.scratch_row, dtype=torch.int64, device=device)
        self.slots = torch.full((size,), table.dummy_slot, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(size, dtype=torch.int32, device=device)        # [bucket]
        self.logits_index = torch.arange(size, dtype=torch.int64, device=device)  # [bucket]
        self._empty_i32 = torch.zeros(0, dtype=torch.int32, device=device)
        self._cu_zero = torch.zeros(1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def fits(self, num_decode: int) -> bool:
        return 0 < num_decode <= self.buckets[-1]

    def _static_batch(self, bucket: int, max_seq_len: int) -> ForwardBatch:
        return ForwardBatch(
            input_ids=self.input_ids[:bucket], positions=self.positions[:bucket],
            out_rows=self.out_rows[:bucket], slots=self.slots[:bucket],
            logits_index=self.logits_index[:bucket], num_decode=bucket,
            seq_lens=self.seq_lens[:bucket], max_seq_len=max_seq_len,
            prefix_lens=self._empty_i32, cu_new_lens=self._cu_zero, max_new_len=0)

    def capture_all(self) -> None:
        """Capture every bucket (largest first, sharing one memory pool)."""
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        for bucket in reversed(self.buckets):
            batch = self._static_batch(bucket, self.max_model_len)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up: compile kernels, settle allocations
                    self.model.forward(batch, self.cache)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bucket] = self.model.forward(batch, self.cache)
            self.graphs[bucket] = graph
        torch.cuda.synchronize()
        log.info("captured decode CUDA graphs for batch sizes %s", self.buckets)

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits [num_decode, vocab] of a pure-decode batch, through the bucket's graph."""
        n = batch.num_decode
        bucket = self.buckets[bisect.bisect_left(self.buckets, n)]
        self.input_ids[:n].copy_(batch.input_ids)
        self.positions[:n].copy_(batch.positions)
        self.out_rows[:n].copy_(batch.out_rows)
        self.slots[:n].copy_(batch.slots)
        self.seq_lens[:n].copy_(batch.seq_lens)
        if n < bucket:  # padding rows: scratch row, dummy slot, one token of context
            self.input_ids[n:bucket].zero_()
            self.positions[n:bucket].zero_()
            self.out_rows[n:bucket].fill_(self.table.scratch_row)
            self.slots[n:bucket].fill_(self.table.dummy_slot)
            self.seq_lens[n:bucket].fill_(1)
        if self.capture:
            self.graphs[bucket].replay()
            return self.outputs[bucket][:n]
        logits = self.model.forward(self._static_batch(bucket, batch.max_seq_len), self.cache)
        return logits[:n]
