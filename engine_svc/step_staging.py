"""One host->device copy in, one device->host copy out, per step.

`StepStaging` packs a step's index arrays (token ids, positions, pool rows, slots, lengths, the
request->token table updates) into one host buffer, pinned on CUDA, at 16-byte aligned offsets
(so every typed view is as aligned as a fresh tensor and Triton never compiles an unaligned
variant), then copies the used bytes to the device with one non-blocking copy and hands out typed
views of the device bytes. The destination is the staging's own device buffer, or a caller's
fixed buffer with the same layout (the CUDA-graph runner's static inputs): then the copy lands
directly where the captured graphs read. Before the host buffer is rewritten the previous copy's
event is awaited (it has long finished by then: the step's results were read back in between).

`outputs_to_host` brings every tensor of a sampler result back with one copy of their bytes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

ALIGN = 16  # bytes: the alignment Triton specializes pointers on


@dataclass(frozen=True, slots=True)
class Field:
    """One typed array in a staging layout."""

    name: str
    dtype: torch.dtype
    count: int      # capacity in elements
    offset: int     # bytes from the layout's start, a multiple of ALIGN


def make_layout(fields: list[tuple[str, torch.dtype, int]]) -> tuple[dict[str, Field], int]:
    """(name -> Field, total bytes) for (name, dtype, count) triples, each start 16-byte aligned."""
    layout: dict[str, Field] = {}
    offset = 0
    for name, dtype, count in fields:
        layout[name] = Field(name, dtype, count, offset)
        offset += -(-count * dtype.itemsize // ALIGN) * ALIGN
    return layout, max(offset, ALIGN)


_NUMPY = {torch.int64: np.int64, torch.int32: np.int32, torch.float32: np.float32}


class StepStaging:
    """A growable (pinned) host buffer and its device twin; one copy per `stage` call."""

    def __init__(self, device: torch.device, initial_bytes: int = 1 << 16) -> None:
        self.device = torch.device(device)
        self._pinned = self.device.type == "cuda"
        self._host = self._alloc_host(initial_bytes)
        self._device_buffer = torch.empty(initial_bytes, dtype=torch.uint8, device=self.device)
        self._copied = torch.cuda.Event() if self._pinned else None   # re-recorded each copy
        self._recorded = False
        self.copies = 0   # host->device copies made (tests count them)

    def _alloc_host(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self._pinned)

    def stage(self, arrays: dict[str, np.ndarray], layout: dict[str, Field] | None = None,
              nbytes: int | None = None, dest: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Copy `arrays` to the device in one copy; returns name -> device view of each array.

        Without `layout` the arrays are packed in order (dtypes int64/int32 as given). With a
        fixed `layout` (+ its `nbytes`) and `dest` (a uint8 device buffer of at least nbytes),
        every field of the layout is copied into `dest`: views are the first len(array) elements.
        """
        if layout is None:
            layout, nbytes = make_layout([(name, _torch_dtype(a), len(a)) for name, a in arrays.items()])
        assert nbytes is not None
        if self._recorded:
            self._copied.synchronize()   # the last copy has read the host buffer
        if self._host.numel() < nbytes:
            self._host = self._alloc_host(max(nbytes, 2 * self._host.numel()))
        host = self._host.numpy()
        for name, array in arrays.items():
            spec = layout[name]
            if len(array) > spec.count:
                raise ValueError(f"staging field {name}: {len(array)} > capacity {spec.count}")
            view = host[spec.offset:spec.offset + len(array) * spec.dtype.itemsize]
            view.view(_NUMPY[spec.dtype])[:] = array
        if dest is None:
            if self._device_buffer.numel() < nbytes:
                self._device_buffer = torch.empty(max(nbytes, 2 * self._device_buffer.numel()),
                                                  dtype=torch.uint8, device=self.device)
            dest = self._device_buffer
        dest[:nbytes].copy_(self._host[:nbytes], non_blocking=self._pinned)
        self.copies += 1
        if self._copied is not None:
            self._copied.record()
            self._recorded = True
        return {name: typed_view(dest, layout[name], len(array)) for name, array in arrays.items()}


def typed_view(buffer: torch.Tensor, spec: Field, count: int | None = None) -> torch.Tensor:
    """The first `count` (default: all) elements of field `spec` inside uint8 `buffer`."""
    count = spec.count if count is None else count
    size = spec.dtype.itemsize
    return buffer[spec.offset:spec.offset + spec.count * size].view(spec.dtype)[:count]


def _torch_dtype(array: np.ndarray) -> torch.dtype:
    for dtype, np_dtype in _NUMPY.items():
        if array.dtype == np_dtype:
            return dtype
    raise TypeError(f"staging holds int64, int32 or float32 arrays, got {array.dtype}")


def outputs_to_host(output):
    """A copy of dataclass `output` whose tensors are on the CPU, fetched in one device->host copy
    of their concatenated bytes (one sync instead of one per tensor). CPU results pass through."""
    names = [f.name for f in dataclasses.fields(output)
             if isinstance(getattr(output, f.name), torch.Tensor)]
    # widest elements first: every part then starts at a multiple of its own element size
    names.sort(key=lambda name: -getattr(output, name).element_size())
    tensors = [getattr(output, name) for name in names]
    if not tensors or all(t.device.type == "cpu" for t in tensors):
        return output
    flat = [t.detach().contiguous().view(-1) for t in tensors]
    packed = torch.cat([t.view(torch.uint8) for t in flat]).cpu()  # the step's one sync
    host: dict[str, torch.Tensor] = {}
    offset = 0
    for name, tensor, part in zip(names, tensors, flat):
        nbytes = part.numel() * part.element_size()
        host[name] = packed[offset:offset + nbytes].view(tensor.dtype).view(tensor.shape)
        offset += nbytes
    return dataclasses.replace(output, **host)
