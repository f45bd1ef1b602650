"""Decode steps replayed as CUDA graphs, one graph per batch-size bucket.

A decode batch of n requests runs in the smallest bucket >= n. The step's index tensors are
copied into static buffers; the rows past n are padding that reads and writes only a scratch
pool row through a dummy request->token slot (both owned by `ReqToTokenTable`), so they never
touch real K/V. The sequence lengths live in a static tensor refreshed before every replay;
decode attention reads them on the device and is launched with a fixed `max_seq_len`
(= max_model_len), so one graph serves every length.

The static inputs live in one device buffer with a fixed, 16-byte aligned layout
(`step_staging.make_layout`). The model runner stages a decode step straight into it: the step's
arrays, padded on the host to the bucket, arrive with one non-blocking host->device copy, and
`run` finds them in place (no per-field copies, no fills). A batch built elsewhere is copied in.

With `capture=False` (CPU, or `--no-cuda-graphs` kept for testing) the same padded static
path runs eagerly, which is how the padding logic is tested without a GPU.
"""
from __future__ import annotations

import bisect
import logging

import numpy as np
import torch

from engine_svc.forward_batch import ForwardBatch, KVCache
from engine_svc.models.llama import LlamaModel
from engine_svc.req_to_token import ReqToTokenTable
from engine_svc.step_staging import StepStaging, make_layout, typed_view

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
        # static inputs: one buffer, one field per index array (each [size]); the table updates
        # of a decode step (one entry per request) ride along in the same copy
        self.layout, self.layout_bytes = make_layout([
            ("input_ids", torch.int64, size), ("positions", torch.int64, size),
            ("out_rows", torch.int64, size), ("slots", torch.int32, size),
            ("seq_lens", torch.int32, size), ("table_pos", torch.int64, size),
            ("table_rows", torch.int32, size)])
        self.static = torch.zeros(self.layout_bytes, dtype=torch.uint8, device=device)
        self.input_ids = typed_view(self.static, self.layout["input_ids"])      # [size] int64
        self.positions = typed_view(self.static, self.layout["positions"])      # [size] int64
        self.out_rows = typed_view(self.static, self.layout["out_rows"])        # [size] int64
        self.slots = typed_view(self.static, self.layout["slots"])              # [size] int32
        self.seq_lens = typed_view(self.static, self.layout["seq_lens"])        # [size] int32
        self.out_rows.fill_(table.scratch_row)
        self.slots.fill_(table.dummy_slot)
        self.seq_lens.fill_(1)
        self.logits_index = torch.arange(size, dtype=torch.int64, device=device)  # [bucket]
        self.pool_bytes = 0   # device memory the captured graphs hold (set by capture_all)
        self._empty_i32 = torch.zeros(0, dtype=torch.int32, device=device)
        self._cu_zero = torch.zeros(1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def fits(self, num_decode: int) -> bool:
        return 0 < num_decode <= self.buckets[-1]

    def bucket_for(self, num_decode: int) -> int:
        """The smallest bucket >= num_decode (which must fit)."""
        return self.buckets[bisect.bisect_left(self.buckets, num_decode)]

    def stage(self, staging: StepStaging, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Put a decode step's arrays into the static inputs with one copy; padding rows (up to
        the bucket) get the scratch row, the dummy slot and one token of context. Returns the
        device views [:n] (table_pos/table_rows: [:entries]) for the step's ForwardBatch."""
        n = len(arrays["input_ids"])
        pad = self.bucket_for(n) - n
        padding = {"input_ids": 0, "positions": 0, "out_rows": self.table.scratch_row,
                   "slots": self.table.dummy_slot, "seq_lens": 1}
        padded = {name: np.concatenate([array, np.full(pad, padding[name], array.dtype)])
                  if name in padding and pad else array for name, array in arrays.items()}
        views = staging.stage(padded, layout=self.layout, nbytes=self.layout_bytes, dest=self.static)
        return {name: view[:len(arrays[name])] for name, view in views.items()}

    def _static_batch(self, bucket: int, max_seq_len: int) -> ForwardBatch:
        return ForwardBatch(
            input_ids=self.input_ids[:bucket], positions=self.positions[:bucket],
            out_rows=self.out_rows[:bucket], slots=self.slots[:bucket],
            logits_index=self.logits_index[:bucket], num_decode=bucket,
            seq_lens=self.seq_lens[:bucket], max_seq_len=max_seq_len,
            prefix_lens=self._empty_i32, cu_new_lens=self._cu_zero, max_new_len=0)

    def capture_all(self) -> None:
        """Capture every bucket (largest first, sharing one memory pool)."""
        device = self.static.device
        reserved_before = torch.cuda.memory_reserved(device)
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(device=device)
        for bucket in reversed(self.buckets):
            batch = self._static_batch(bucket, self.max_model_len)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up: compile kernels, settle allocations
                    self.model.forward(batch, self.cache)
            torch.cuda.current_stream(device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bucket] = self.model.forward(batch, self.cache)
            self.graphs[bucket] = graph
        torch.cuda.synchronize(device)
        # the warm-ups' blocks are cached for the side stream, where no step ever runs: free them
        torch.cuda.empty_cache()
        self.pool_bytes = torch.cuda.memory_reserved(device) - reserved_before
        log.info("captured decode CUDA graphs for batch sizes %s (%.1f MiB)", self.buckets,
                 self.pool_bytes / 2**20)

    def _holds(self, batch: ForwardBatch) -> bool:
        """True when the batch's inputs already are the static buffers (staged by `stage`)."""
        return batch.input_ids.data_ptr() == self.input_ids.data_ptr()

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits [num_decode, vocab] of a pure-decode batch, through the bucket's graph."""
        n = batch.num_decode
        bucket = self.bucket_for(n)
        if not self._holds(batch):  # built elsewhere: copy in, pad
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
