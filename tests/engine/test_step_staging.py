"""One host->device copy per step (into the CUDA graphs' static inputs on graph steps) and one
device->host copy of the sampled results: the staging buffer, and the runner using it."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from engine_svc.params import SamplingParams, StoppingParams
from engine_svc.step_staging import ALIGN, StepStaging, make_layout, outputs_to_host
from tests.engine.helpers import GREEDY, make_engine


def test_stage_packs_every_array_in_one_copy_at_aligned_offsets():
    staging = StepStaging(torch.device("cpu"), initial_bytes=64)
    arrays = {"ids": np.arange(7, dtype=np.int64), "slots": np.array([3, 1, 2], dtype=np.int32),
              "empty": np.zeros(0, dtype=np.int32), "rows": np.arange(5, dtype=np.int64) * 10}
    views = staging.stage(arrays)
    assert staging.copies == 1
    for name, array in arrays.items():
        assert views[name].dtype == torch.from_numpy(array).dtype
        assert views[name].tolist() == array.tolist()
        assert views[name].data_ptr() % ALIGN == 0   # Triton sees aligned pointers only
    again = staging.stage({"ids": np.arange(100, dtype=np.int64)})   # grows, still one copy
    assert again["ids"].tolist() == list(range(100)) and staging.copies == 2


def test_fixed_layout_lands_in_the_callers_buffer():
    layout, nbytes = make_layout([("a", torch.int64, 8), ("b", torch.int32, 8)])
    dest = torch.zeros(nbytes, dtype=torch.uint8)
    views = StepStaging(torch.device("cpu")).stage({"a": np.arange(3, dtype=np.int64),
                                                    "b": np.arange(5, dtype=np.int32)},
                                                   layout=layout, nbytes=nbytes, dest=dest)
    assert views["a"].data_ptr() == dest.data_ptr() and views["a"].tolist() == [0, 1, 2]
    assert views["b"].data_ptr() == dest.data_ptr() + layout["b"].offset


@dataclass
class _Result:
    token_ids: torch.Tensor
    logprobs: torch.Tensor | None
    mask: torch.Tensor
    label: str


def test_outputs_come_back_whole_in_one_packed_copy(monkeypatch):
    """The packing round trip (run on CPU by pretending the tensors are elsewhere)."""
    result = _Result(torch.tensor([5, 9]), torch.tensor([-0.5, -1.25]),
                     torch.tensor([[True, False], [False, True]]), "x")
    copies = []
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("meta")))
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self: copies.append(self.numel()) or real_cpu(self))
    host = outputs_to_host(result)
    monkeypatch.undo()
    assert len(copies) == 1 and host.label == "x"
    assert host.token_ids.tolist() == [5, 9] and host.token_ids.dtype == torch.int64
    assert host.logprobs.tolist() == [-0.5, -1.25] and host.mask.tolist() == [[True, False], [False, True]]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tests.conftest import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny"), num_kv_heads=2, seed=11)


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_runner_makes_one_host_to_device_copy_per_step(tiny_dir, cuda_graphs):
    """Mixed, prefill and decode steps each stage once; graph steps stage straight into the
    graphs' static inputs (found in place: no per-field copies); results come back on the host."""
    engine = make_engine(tiny_dir, cuda_graphs=cuda_graphs, max_num_seqs=4, enable_prefix_caching=False)
    runner = engine.runner
    steps, in_place = [], []
    execute = runner.execute
    if cuda_graphs:
        holds = runner.graphs._holds
        runner.graphs._holds = lambda batch: in_place.append(holds(batch)) or in_place[-1]

    def counted(plan):
        before = runner.staging.copies
        out = execute(plan)
        steps.append(runner.staging.copies - before)
        assert out is None or out.token_ids.device.type == "cpu"
        return out

    runner.execute = counted
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13], [20, 21, 22, 23, 24, 25, 26]]
    stopping = StoppingParams(max_new_tokens=6, ignore_eos=True)
    out = engine.generate(prompts, SamplingParams(temperature=0.7, seed=3), stopping)
    assert all(len(tokens) == 6 for tokens in out) and steps and set(steps) == {1}
    if cuda_graphs:
        assert in_place and all(in_place)
    reference = make_engine(tiny_dir, cuda_graphs=False, max_num_seqs=4, enable_prefix_caching=False)
    assert engine.generate(prompts, GREEDY, stopping) == reference.generate(prompts, GREEDY, stopping)
