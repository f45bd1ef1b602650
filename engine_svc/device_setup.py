"""Device choices made once at engine start: which CUDA device is current, and how decode runs.

- `bind_device`: `--device cuda:N` makes N the current device before anything touches CUDA, so
  Triton launches, the memory probe, graph streams and pools all land on N (torch's current
  device is per thread: the runner binds the engine thread again on its first step).
- `decode_graph_mode`: CUDA graphs need a decode path that never syncs with the host while
  capturing. The Triton backend's is; the torch backend's decode (kernels/cpu) reads lengths on
  the host and gathers over max_seq_len, so on CUDA it runs eagerly, without graphs.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

CAPTURE, EAGER_PADDED = "capture", "eager"


def bind_device(device: torch.device) -> torch.device:
    """The device with an explicit index, made current (CUDA); CPU devices pass through."""
    if device.type != "cuda":
        return device
    index = torch.cuda.current_device() if device.index is None else device.index
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        raise ValueError(f"device: cuda:{index} does not exist ({count} CUDA device(s))")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def bind_thread(device: torch.device) -> None:
    """Make `device` current on the calling thread (a no-op when it already is, or on CPU)."""
    if device.type == "cuda" and torch.cuda.current_device() != device.index:
        torch.cuda.set_device(device.index)


def decode_graph_mode(requested: bool | None, device: torch.device, backend: str) -> str | None:
    """None (plain eager decode), EAGER_PADDED (the graphs' padded static path run eagerly: CPU
    tests) or CAPTURE (CUDA graphs). `requested` is EngineConfig.cuda_graphs."""
    if requested is False:
        return None
    if device.type != "cuda":
        return EAGER_PADDED if requested else None
    if backend == "triton":
        return CAPTURE
    if requested:
        log.warning("cuda_graphs: the %r backend's decode syncs with the host; running it "
                    "eagerly (padded), not captured", backend)
        return EAGER_PADDED
    return None
