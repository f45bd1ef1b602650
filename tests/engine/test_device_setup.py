"""Device choices at engine start, tested with torch.cuda faked (no GPU here):
`--device cuda:N` makes N current everywhere (also on the engine thread, and for the decode
kernel's SM count); CUDA graphs are captured only over a decode path that never syncs (Triton),
so `--backend torch` on CUDA starts without capturing.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from engine_svc import device_setup
from engine_svc.device_setup import CAPTURE, EAGER_PADDED, bind_device, bind_thread, decode_graph_mode
from engine_svc.model_runner import ModelRunner, resolve_device
from kernels.triton import launch


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda with two devices, device 0 current; records set_device calls."""
    state = SimpleNamespace(current=0, set_calls=[])

    def set_device(index):
        state.set_calls.append(int(index))
        state.current = int(index)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: state.current)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    return state


def test_cuda_n_becomes_the_current_device(fake_cuda):
    device = bind_device(resolve_device("cuda:1"))
    assert device == torch.device("cuda", 1) and fake_cuda.set_calls == [1]
    assert bind_device(resolve_device("cuda")) == torch.device("cuda", 1)  # explicit index
    with pytest.raises(ValueError, match="cuda:2 does not exist"):
        bind_device(resolve_device("cuda:2"))
    assert bind_device(torch.device("cpu")) == torch.device("cpu")


def test_engine_thread_is_bound_before_each_step(fake_cuda):
    """torch's current device is per thread: the runner rebinds whichever thread executes."""
    fake_cuda.current = 0   # a fresh thread starts on device 0
    bind_thread(torch.device("cuda", 1))
    assert fake_cuda.current == 1
    bind_thread(torch.device("cuda", 1))
    assert fake_cuda.set_calls == [1]   # already current: no call
    bind_thread(torch.device("cpu"))


def test_decode_kernel_sizes_splits_for_the_current_device(fake_cuda, monkeypatch):
    seen = []
    monkeypatch.setattr(launch, "_multiprocessor_count", lambda index: seen.append(index) or 132)
    fake_cuda.current = 1
    assert launch.target_programs(torch.device("cuda")) == 4 * 132
    launch.target_programs(torch.device("cuda", 1))
    assert seen == [1, 1]   # not device 0


def test_graphs_are_captured_only_over_the_sync_free_decode():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert decode_graph_mode(None, cuda, "triton") == CAPTURE
    assert decode_graph_mode(None, cuda, "torch") is None
    assert decode_graph_mode(True, cuda, "torch") == EAGER_PADDED
    assert decode_graph_mode(False, cuda, "triton") is None
    assert decode_graph_mode(None, cpu, "torch") is None
    assert decode_graph_mode(True, cpu, "torch") == EAGER_PADDED


def test_runner_with_torch_backend_on_cuda_captures_nothing(monkeypatch):
    """ModelRunner._decode_graphs on a CUDA, torch-backend runner: no graph object, no capture
    (the torch decode reads seq_lens on the host, illegal while capturing)."""
    captured = []

    class RecordingGraphs:
        def __init__(self, model, cache, table, capture):
            self.capture = capture

        def capture_all(self):
            captured.append(True)

    monkeypatch.setattr("engine_svc.model_runner.DecodeGraphs", RecordingGraphs)
    runner = SimpleNamespace(config=SimpleNamespace(cuda_graphs=None), device=torch.device("cuda", 0),
                             backend="torch", model=None, cache=None, table=None)
    runner.graph_mode = device_setup.decode_graph_mode(None, runner.device, runner.backend)
    assert ModelRunner._decode_graphs(runner) is None and not captured
    runner.backend = "triton"
    runner.graph_mode = device_setup.decode_graph_mode(None, runner.device, runner.backend)
    assert ModelRunner._decode_graphs(runner).capture and captured == [True]
