"""One batch, many settings: greedy and seeded sampling with different temperatures and
top_logprobs k (0, 1, 5) side by side give every request what it gets when it runs alone."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from engine_svc.params import SamplingParams, StoppingParams
from tests.engine.helpers import make_engine

NEW_TOKENS = 10
LOGPROB_TOLERANCE = 1e-4

# (request id, sampling): mixed k, greedy and seeded rows, filters and a penalty
REQUESTS = [
    ("greedy-k0", SamplingParams(temperature=0.0)),
    ("greedy-k5", SamplingParams(temperature=0.0, top_logprobs=5)),
    ("seeded-k1", SamplingParams(temperature=0.8, seed=11, top_logprobs=1)),
    ("seeded-k0", SamplingParams(temperature=1.3, top_p=0.9, seed=22)),
    ("greedy-k1", SamplingParams(temperature=0.0, top_logprobs=1)),
    ("seeded-k5", SamplingParams(temperature=0.7, top_k=40, seed=33, top_logprobs=5)),
    ("penalty-k1", SamplingParams(temperature=1.0, repetition_penalty=1.5, seed=44,
                                  top_logprobs=1)),
]


@dataclass
class Collected:
    """Everything the engine returned for one request."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tests.conftest import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-mixed"), num_kv_heads=2, seed=7)


def prompt_of(index: int) -> list[int]:
    return [(37 * index + 11 * j) % 300 + 3 for j in range(5 + 3 * index)]


def run(engine, arrivals: dict[int, list[int]]) -> tuple[dict[str, Collected], int]:
    """Add REQUESTS[i] for i in arrivals[step] at that step; results and the largest batch."""
    results: dict[str, Collected] = {}
    stopping = StoppingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    largest, step = 0, 0
    while engine.has_work() or any(k >= step for k in arrivals):
        for index in arrivals.get(step, []):
            request_id, sampling = REQUESTS[index]
            results[request_id] = Collected()
            engine.add_request(request_id, prompt_of(index), sampling, stopping)
        for out in engine.step():
            got = results[out.request_id]
            got.tokens.extend(out.token_ids)
            got.logprobs.extend(out.logprobs)
            got.top.extend(out.top_logprobs)
        largest = max(largest, engine.last_step.batch_size)
        step += 1
    return results, largest


def assert_same(request_id: str, k: int, together: Collected, alone: Collected) -> None:
    """Tokens equal; for k > 0, logprobs and the k alternatives per token equal too."""
    assert together.tokens == alone.tokens and len(alone.tokens) == NEW_TOKENS, request_id
    if k == 0:  # nothing asked for: no logprobs, no alternatives, alone or batched
        assert together.top == [] and alone.top == [], request_id
        assert together.logprobs == [] and alone.logprobs == [], request_id
        return
    assert len(together.logprobs) == len(alone.logprobs) == NEW_TOKENS, request_id
    assert together.logprobs == pytest.approx(alone.logprobs, abs=LOGPROB_TOLERANCE), request_id
    assert len(together.top) == len(alone.top) == NEW_TOKENS, request_id
    for position, (mine, solo) in enumerate(zip(together.top, alone.top)):
        assert len(mine) == len(solo) == k, (request_id, position, len(mine))
        assert [t for t, _ in mine] == [t for t, _ in solo], (request_id, position)
        assert [lp for _, lp in mine] == pytest.approx([lp for _, lp in solo],
                                                      abs=LOGPROB_TOLERANCE)
    for entries in together.top:
        assert [lp for _, lp in entries] == sorted((lp for _, lp in entries), reverse=True)
    if request_id.startswith("greedy"):  # greedy picks the most likely token: the first entry
        assert [entries[0][0] for entries in together.top] == together.tokens
        assert [entries[0][1] for entries in together.top] == together.logprobs


@pytest.mark.parametrize("stagger", [0, 2], ids=["one-batch", "staggered"])
def test_mixed_settings_in_one_batch_equal_each_request_alone(tiny_dir, stagger: int) -> None:
    engine = make_engine(tiny_dir, enable_prefix_caching=False)
    alone = {}
    for index in range(len(REQUESTS)):
        alone.update(run(engine, {0: [index]})[0])
    arrivals: dict[int, list[int]] = {}
    for index in range(len(REQUESTS)):
        arrivals.setdefault(index * stagger, []).append(index)
    together, largest = run(engine, arrivals)
    if stagger == 0:
        assert largest == len(REQUESTS)  # really one batch: every request in the same steps
    else:
        assert largest >= 3
    for request_id, sampling in REQUESTS:
        assert_same(request_id, sampling.top_logprobs, together[request_id], alone[request_id])
    assert engine.pool.is_idle()
