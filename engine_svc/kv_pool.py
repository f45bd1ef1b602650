"""Host-side bookkeeping of the token-level KV pool: reference counts and free-row search.

A row is free when its reference count is 0. Free rows are a bitmap plus a per-block summary
(free rows, free run at the block's head and at its tail, longest free run inside the block).
The summary is refreshed lazily, only for blocks touched since the last search, so finding a
contiguous run costs O(blocks) plus one block scan rather than a scan of the whole pool.
Allocation is next-fit: a cursor remembers where the last allocation ended, and when the rows
from the cursor on are free the run is taken in O(n) without looking at the summary at all.

`share` and `free` accept repeated rows: a row listed k times gains / loses k references
(the caller must hold that many). Everything is vectorised; nothing loops per token in Python.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

DEFAULT_BLOCK_ROWS = 1024  # rows per summary block


def _block_run_stats(blocks: np.ndarray) -> tuple[np.ndarray, ...]:
    """Free count, head run, tail run and longest run of each row of a [k, block_rows] free mask."""
    width = blocks.shape[1]
    free = np.count_nonzero(blocks, axis=1).astype(np.int64)
    head = np.where(free == width, width, 0)  # right for all-free and all-used blocks
    tail, inner = head.copy(), head.copy()
    mixed = np.flatnonzero((free > 0) & (free < width))
    if mixed.size:
        head[mixed], tail[mixed], inner[mixed] = _mixed_run_stats(blocks[mixed])
    return free, head, tail, inner


def _mixed_run_stats(blocks: np.ndarray) -> tuple[np.ndarray, ...]:
    """Head run, tail run and longest run of blocks that hold both free and used rows."""
    k, width = blocks.shape
    used = ~blocks
    head = used.argmax(axis=1)
    tail = used[:, ::-1].argmax(axis=1)
    padded = np.zeros((k, width + 2), np.int8)  # a used column on both sides cuts runs per block
    padded[:, 1:-1] = blocks
    steps = np.diff(padded.ravel())
    starts = np.flatnonzero(steps == 1)
    lengths = np.flatnonzero(steps == -1) - starts
    block_of_run = starts // (width + 2)
    first = np.flatnonzero(np.r_[True, block_of_run[1:] != block_of_run[:-1]])
    inner = np.maximum.reduceat(lengths, first)  # every mixed block has at least one run
    return head, tail, inner


class KVPool:
    """Host-side bookkeeping of a token-level KV pool: one row per token, reference counted."""

    def __init__(self, capacity: int, *, block_rows: int = DEFAULT_BLOCK_ROWS) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 1:
            raise ValueError(f"capacity must be an integer >= 1, got {capacity!r}")
        if not isinstance(block_rows, int) or block_rows < 2 or block_rows & (block_rows - 1):
            raise ValueError(f"block_rows must be a power of two >= 2, got {block_rows!r}")
        self.capacity: int = int(capacity)
        self._shift = block_rows.bit_length() - 1
        self._block = block_rows
        self._counts = np.zeros(self.capacity, np.int32)  # references per row
        self._num_blocks = -(-self.capacity // self._block)
        # free mask padded to whole blocks; padding rows are never free
        self._free_mask = np.zeros(self._num_blocks * self._block, bool)
        self._free_mask[: self.capacity] = True
        self._block_view = self._free_mask.reshape(self._num_blocks, self._block)
        self._dup_scratch = np.zeros(self.capacity, np.int32)  # duplicate detection in O(n)
        self._num_free = self.capacity
        self._num_shared = 0
        self._cursor = 0
        self._dirty = np.zeros(self._num_blocks, bool)
        stats = _block_run_stats(self._block_view)
        self._blk_free, self._blk_head, self._blk_tail, self._blk_inner = stats

    # ---- counters -------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return self._num_free

    @property
    def num_used(self) -> int:
        return self.capacity - self._num_free

    @property
    def num_shared(self) -> int:
        """Rows with two or more references (shared through the prefix cache)."""
        return self._num_shared

    def is_idle(self) -> bool:
        """True when every row is free."""
        return self._num_free == self.capacity

    # ---- allocation -----------------------------------------------------------------------
    def alloc(self, n: int) -> np.ndarray | None:
        """n fresh rows (count 1 each), contiguous when possible; None (no change) if too few are free."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n must be an integer >= 0, got {n!r}")
        n = int(n)
        if n > self._num_free:
            return None
        if n == 0:
            return np.empty(0, np.int64)
        start = self._find_run(n)
        if start is not None:
            return self._take_run(start, n)
        rows = self._scattered_rows(n)
        self._counts[rows] = 1
        self._free_mask[rows] = False
        self._dirty[rows >> self._shift] = True
        self._num_free -= n
        self._cursor = int(rows[-1] + 1) % self.capacity
        return rows

    def _take_run(self, start: int, n: int) -> np.ndarray:
        end = start + n
        self._counts[start:end] = 1
        self._free_mask[start:end] = False
        self._dirty[start >> self._shift : ((end - 1) >> self._shift) + 1] = True
        self._num_free -= n
        self._cursor = end % self.capacity
        return np.arange(start, end, dtype=np.int64)

    def _find_run(self, n: int) -> int | None:
        """Start of a free run of n rows, preferring the first one at or after the cursor."""
        cursor = self._cursor
        if cursor + n <= self.capacity and self._free_mask[cursor : cursor + n].all():
            return cursor
        if cursor + n > self.capacity and self._free_mask[:n].all():
            return 0  # the cursor wraps around
        self._refresh_blocks()
        block_ids = np.arange(self._num_blocks)
        not_full = self._blk_free < self._block
        last_not_full = np.maximum.accumulate(np.where(not_full, block_ids, -1))
        tail_of_last = np.where(last_not_full >= 0, self._blk_tail[last_not_full], 0)
        run_to_end = (block_ids - last_not_full) * self._block + tail_of_last  # free run ending at block end
        # every free run either lies inside one block (inner) or crosses into a block c >= 1
        span_len = run_to_end[:-1] + self._blk_head[1:]
        span_start = (block_ids[:-1] + 1) * self._block - run_to_end[:-1]
        inner_ok = self._blk_inner >= n
        starts = np.concatenate([span_start[span_len >= n], block_ids[inner_ok] * self._block])
        if starts.size == 0:
            return None
        best = int(np.argmin((starts - cursor) % self.capacity))
        num_span = starts.size - int(np.count_nonzero(inner_ok))
        if best < num_span:
            return int(starts[best])
        return self._run_in_block(int(starts[best]) >> self._shift, n)

    def _run_in_block(self, block: int, n: int) -> int:
        free_offsets = np.flatnonzero(self._block_view[block])  # sorted free rows of the block
        hits = np.flatnonzero(free_offsets[n - 1 :] - free_offsets[: free_offsets.size - n + 1] == n - 1)
        return block * self._block + int(free_offsets[hits[0]])

    def _scattered_rows(self, n: int) -> np.ndarray:
        """The first n free rows in next-fit order (blocks from the cursor's block on, wrapping)."""
        order = np.roll(np.arange(self._num_blocks), -(self._cursor >> self._shift))
        free_in_order = self._blk_free[order]
        needed_blocks = int(np.searchsorted(np.cumsum(free_in_order), n)) + 1
        chosen = order[:needed_blocks][free_in_order[:needed_blocks] > 0]
        flat = np.flatnonzero(self._block_view[chosen])[:n]  # [n] positions in chosen blocks
        return chosen[flat >> self._shift] * self._block + (flat & (self._block - 1))

    def _refresh_blocks(self) -> None:
        dirty = np.flatnonzero(self._dirty)
        if dirty.size == 0:
            return
        free, head, tail, inner = _block_run_stats(self._block_view[dirty])
        self._blk_free[dirty] = free
        self._blk_head[dirty] = head
        self._blk_tail[dirty] = tail
        self._blk_inner[dirty] = inner
        self._dirty[dirty] = False

    # ---- reference counting ---------------------------------------------------------------
    def share(self, rows: np.ndarray | Sequence[int]) -> None:
        """Add one reference per listed row; every row must be live (count >= 1)."""
        unique_rows, times = self._unique(self._check_rows(rows))
        before = self._counts[unique_rows]
        if unique_rows.size and (before == 0).any():
            bad = int(unique_rows[np.argmax(before == 0)])
            raise ValueError(f"rows: cannot share row {bad}: it is free (count 0)")
        after = before + times
        self._counts[unique_rows] = after
        self._num_shared += int(np.count_nonzero(after >= 2) - np.count_nonzero(before >= 2))

    def free(self, rows: np.ndarray | Sequence[int]) -> None:
        """Drop one reference per listed row; rows reaching 0 become free. Nothing changes on error."""
        unique_rows, times = self._unique(self._check_rows(rows))
        before = self._counts[unique_rows]
        if unique_rows.size and (before < times).any():
            bad = int(np.argmax(before < times))
            freed = int(np.broadcast_to(times, before.shape)[bad])
            raise ValueError(
                f"rows: double free of row {int(unique_rows[bad])}: released {freed} time(s)"
                f" but it holds {int(before[bad])} reference(s)"
            )
        after = before - times
        self._counts[unique_rows] = after
        released = unique_rows[after == 0]
        self._free_mask[released] = True
        self._dirty[released >> self._shift] = True
        self._num_free += int(released.size)
        self._num_shared += int(np.count_nonzero(after >= 2) - np.count_nonzero(before >= 2))

    def ref_counts(self, rows: np.ndarray | Sequence[int] | None = None) -> np.ndarray:
        """Reference counts (int64 copy) of the given rows, or of every row."""
        if rows is None:
            return self._counts.astype(np.int64)
        return self._counts[self._check_rows(rows)].astype(np.int64)

    def _check_rows(self, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        arr = np.asarray(rows)
        if arr.ndim != 1:
            raise ValueError(f"rows must be a 1-D array of row indices, got shape {arr.shape}")
        if arr.size == 0:
            return np.empty(0, np.int64)
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"rows must hold integers, got dtype {arr.dtype}")
        arr = arr.astype(np.int64, copy=False)
        low, high = int(arr.min()), int(arr.max())
        if low < 0 or high >= self.capacity:
            raise ValueError(f"rows must lie in [0, {self.capacity}), got values in [{low}, {high}]")
        return arr

    def _unique(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | int]:
        """(distinct rows, multiplicity): O(n) when rows has no repeats, a sort otherwise."""
        order = np.arange(rows.size, dtype=np.int32)
        self._dup_scratch[rows] = order  # a repeated row reads back one writer's position only
        if np.array_equal(self._dup_scratch[rows], order):
            return rows, 1
        unique_rows, times = np.unique(rows, return_counts=True)
        return unique_rows, times

    # ---- checks ---------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise AssertionError when the counts, the free bitmap and the block summary disagree."""
        counts, cap = self._counts, self.capacity
        _require(bool((counts >= 0).all()), "a reference count is negative")
        _require(np.array_equal(self._free_mask[:cap], counts == 0), "free bitmap != (counts == 0)")
        _require(not self._free_mask[cap:].any(), "a padding row is marked free")
        _require(self._num_free == int(np.count_nonzero(counts == 0)), "num_free != rows with count 0")
        _require(self.num_used + self.num_free == cap, "used + free != capacity")
        _require(self._num_shared == int(np.count_nonzero(counts >= 2)), "num_shared != rows with count >= 2")
        _require(0 <= self._cursor < cap, "cursor outside the pool")
        clean = np.flatnonzero(~self._dirty)
        fresh = _block_run_stats(self._block_view[clean])
        kept = (self._blk_free, self._blk_head, self._blk_tail, self._blk_inner)
        for name, want, have in zip(("free", "head", "tail", "inner"), fresh, kept):
            _require(np.array_equal(want, have[clean]), f"block summary '{name}' is stale")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise AssertionError(message)
