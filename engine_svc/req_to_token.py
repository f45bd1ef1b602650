"""The request->token table: row `slot`, column j holds the pool row of token j of a request.

One owner for the table and its conventions:
- `SlotAllocator` (host side, plain ints) hands table rows ("slots") to running requests;
  the scheduler uses only this part and never sees a tensor.
- `ReqToTokenTable` holds the device tensor and the allocator, plus the padding conventions
  CUDA-graph decode relies on: one extra table row, the dummy slot (index max_num_seqs), whose
  every column points at one extra pool row, the scratch row (index pool capacity), so padding
  requests read and write only that row and never real K/V.
"""
from __future__ import annotations

import numpy as np
import torch


class SlotAllocator:
    """Free rows of the request->token table, handed to requests while they run."""

    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError(f"need at least one request slot, got {num_slots}")
        self.num_slots = num_slots
        self._free: list[int] = list(range(num_slots - 1, -1, -1))   # pop() gives slot 0 first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self) -> int:
        """A free slot (IndexError when none is left: check num_free first)."""
        return self._free.pop()

    def free(self, slot: int) -> None:
        """Give a slot back (the request stopped running)."""
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is not in [0, {self.num_slots})")
        self._free.append(slot)


class ReqToTokenTable:
    """The device table [max_num_seqs + 1, max_model_len] int32, its slots and padding rows."""

    def __init__(self, max_num_seqs: int, max_model_len: int, pool_capacity: int,
                 device: torch.device) -> None:
        self.slots = SlotAllocator(max_num_seqs)
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.dummy_slot = max_num_seqs         # table row of padding requests
        self.scratch_row = pool_capacity       # pool row padding tokens read and write
        self.pool_rows = pool_capacity + 1     # rows the K/V tensors need: pool + scratch row
        # tensor: [max_num_seqs + 1, max_model_len] int32, row r = pool rows of slot r's tokens
        self.tensor = torch.zeros((max_num_seqs + 1, max_model_len), dtype=torch.int32,
                                  device=device)
        self.tensor[self.dummy_slot].fill_(self.scratch_row)

    def positions(self, slot: int, start: int, stop: int) -> np.ndarray:
        """Flat table indices [stop - start] int64 of tokens [start, stop) of `slot`."""
        if not 0 <= slot < self.max_num_seqs:
            raise ValueError(f"slot {slot} is not a request slot (0..{self.max_num_seqs - 1})")
        return slot * self.max_model_len + np.arange(start, stop, dtype=np.int64)

    def write(self, positions: np.ndarray, rows: np.ndarray) -> None:
        """Set table entries `positions` (flat, from `positions()`) to pool `rows`, one copy."""
        device = self.tensor.device
        self.tensor.view(-1)[torch.from_numpy(positions).to(device)] = \
            torch.from_numpy(rows).to(device, torch.int32)
