"""The CUDA-graph decode path: buckets, padding rows, and results equal to the eager path.

On CPU the graph runner runs its padded static path eagerly (cuda_graphs=True), which checks
the padding logic; on CUDA the same test compares captured graphs with eager decode.
"""
from __future__ import annotations

import pytest
import torch

from engine_svc.cuda_graphs import batch_buckets
from engine_svc.params import SamplingParams, StoppingParams
from tests.engine.helpers import GREEDY, make_engine


def test_buckets_cover_every_batch_size():
    buckets = batch_buckets(200)
    assert buckets[0] == 1 and buckets[-1] == 200 and buckets == sorted(set(buckets))
    assert batch_buckets(5) == [1, 2, 4, 5]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tests.conftest import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny"), num_kv_heads=2, seed=31)


@pytest.mark.parametrize("count", [1, 3, 6])
def test_graph_decode_equals_eager_decode(tiny_dir, count):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator().manual_seed(count)
    prompts = [torch.randint(3, 320, (int(n),), generator=generator).tolist()
               for n in torch.randint(2, 30, (count,), generator=generator)]
    stopping = StoppingParams(max_new_tokens=12, ignore_eos=True)
    eager = make_engine(tiny_dir, device=device, cuda_graphs=False, max_num_seqs=8,
                        backend="auto", enable_prefix_caching=False)
    graphs = make_engine(tiny_dir, device=device, cuda_graphs=True, max_num_seqs=8,
                         backend="auto", enable_prefix_caching=False)
    assert graphs.runner.graphs is not None and eager.runner.graphs is None
    assert graphs.generate(prompts, GREEDY, stopping) == eager.generate(prompts, GREEDY, stopping)
    seeded = SamplingParams(temperature=1.0, seed=5)
    assert graphs.generate(prompts, seeded, stopping) == eager.generate(prompts, seeded, stopping)
    # padding rows wrote only the scratch row: the pool's real rows are all free again
    assert graphs.pool.is_idle()
    scratch = graphs.runner.capacity
    assert graphs.runner.cache.req_to_token[-1].eq(scratch).all()
