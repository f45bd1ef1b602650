"""Continuous batching: batch invariance, staggered arrival, memory pressure, abort."""
from __future__ import annotations

import pytest
import torch

from engine_svc.params import FinishReason, SamplingParams, StoppingParams
from tests.engine.helpers import GREEDY, make_engine, run_alone


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tests.conftest import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny"), num_kv_heads=2, seed=3)


def random_prompts(count: int, seed: int, low: int = 4, high: int = 60) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (count,), generator=generator).tolist()
    return [torch.randint(3, 320, (n,), generator=generator).tolist() for n in lengths]


def drive(engine, arrivals: dict[int, list[tuple[str, list[int], int]]],
          sampling: SamplingParams = GREEDY) -> dict[str, list[int]]:
    """Step the engine; at step k add the requests in arrivals[k]. Returns tokens per request."""
    results: dict[str, list[int]] = {}
    step = 0
    while engine.has_work() or any(k >= step for k in arrivals):
        for request_id, prompt, new_tokens in arrivals.get(step, []):
            results[request_id] = []
            engine.add_request(request_id, prompt, sampling,
                               StoppingParams(max_new_tokens=new_tokens, ignore_eos=True))
        for out in engine.step():
            results[out.request_id].extend(out.token_ids)
        step += 1
    return results


def test_staggered_arrivals_match_each_alone(tiny_dir):
    engine = make_engine(tiny_dir, enable_prefix_caching=False)
    prompts = random_prompts(8, seed=1)
    alone = [run_alone(engine, p, 20) for p in prompts]
    arrivals = {i * 3: [(f"r{i}", p, 20)] for i, p in enumerate(prompts)}
    together = drive(engine, arrivals)
    assert [together[f"r{i}"] for i in range(8)] == alone
    assert engine.pool.is_idle()


def test_chunked_prefill_matches_unchunked(tiny_dir):
    whole = make_engine(tiny_dir, enable_prefix_caching=False)
    chunked = make_engine(tiny_dir, enable_prefix_caching=False, max_num_batched_tokens=32,
                          max_num_seqs=8)
    prompts = random_prompts(4, seed=2, low=70, high=200)
    stopping = StoppingParams(max_new_tokens=12, ignore_eos=True)
    assert chunked.generate(prompts, GREEDY, stopping) == whole.generate(prompts, GREEDY, stopping)
    assert chunked.pool.is_idle()


def test_memory_pressure_preempts_and_still_matches(tiny_dir):
    prompts = random_prompts(32, seed=4, low=20, high=40)
    reference = make_engine(tiny_dir, enable_prefix_caching=False)
    alone = [run_alone(reference, p, 40) for p in prompts]
    # about 4 requests of ~30 + 40 tokens fit in 300 rows; max_model_len bounds one request
    tight = make_engine(tiny_dir, enable_prefix_caching=False, kv_capacity_tokens=300,
                        max_model_len=128, max_num_seqs=16, max_num_batched_tokens=128)
    arrivals = {0: [(f"r{i}", p, 40) for i, p in enumerate(prompts)]}
    together = drive(tight, arrivals)
    assert [together[f"r{i}"] for i in range(32)] == alone
    assert tight.scheduler.num_preemptions > 0
    assert tight.pool.is_idle()
    tight.pool.check_invariants()


def test_abort_frees_rows_at_next_step(tiny_dir):
    engine = make_engine(tiny_dir, enable_prefix_caching=False)
    for i, prompt in enumerate(random_prompts(3, seed=5)):
        engine.add_request(f"a{i}", prompt, GREEDY, StoppingParams(max_new_tokens=50))
    for _ in range(3):
        engine.step()
    assert engine.pool.num_used > 0
    engine.abort("a1")
    outputs = engine.step()
    aborted = [o for o in outputs if o.request_id == "a1"]
    assert len(aborted) == 1 and aborted[0].finish_reason is FinishReason.ABORTED
    engine.abort("a0")
    engine.abort("a2")
    engine.step()
    assert engine.pool.is_idle() and not engine.has_work()
    engine.abort("a0")  # already gone: a no-op
    assert engine.step() == []


def test_stopping_rules(tiny_dir):
    engine = make_engine(tiny_dir, enable_prefix_caching=False)
    prompt = random_prompts(1, seed=6)[0]
    free_run = run_alone(engine, prompt, 30)
    stop_at = free_run[10]
    engine.add_request("s", prompt, GREEDY, StoppingParams(max_new_tokens=30,
                                                           stop_token_ids=[stop_at]))
    outs = []
    while engine.has_work():
        outs.extend(engine.step())
    tokens = [t for o in outs for t in o.token_ids]
    assert tokens == free_run[:free_run.index(stop_at) + 1]
    assert outs[-1].finish_reason is FinishReason.STOP_TOKEN
    assert outs[-1].completion_tokens == len(tokens) and outs[-1].prompt_tokens == len(prompt)
    # max_model_len ends a request with LENGTH before max_new_tokens
    short = make_engine(tiny_dir, max_model_len=len(prompt) + 5)
    got = short.generate([prompt], GREEDY, StoppingParams(max_new_tokens=5, ignore_eos=True))
    assert got == [free_run[:5]]


@pytest.mark.parametrize("field,value", [
    ("temperature", -1.0), ("top_p", 0.0), ("top_k", -2), ("min_p", 1.5),
    ("repetition_penalty", 0.0), ("temperature", float("nan")),
])
def test_invalid_sampling_rejected_with_field_name(tiny_dir, field, value):
    engine = make_engine(tiny_dir)
    sampling = SamplingParams(**{field: value})
    with pytest.raises(ValueError, match=field):
        engine.add_request("bad", [5, 6, 7], sampling)
    assert not engine.has_work()


def test_invalid_prompts_rejected(tiny_dir):
    engine = make_engine(tiny_dir, max_model_len=64)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        engine.add_request("e", [])
    with pytest.raises(ValueError, match=r"\[0, 320\)"):
        engine.add_request("v", [5, 320])
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("l", [5] * 60, stopping=StoppingParams(max_new_tokens=10))
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.add_request("z", [5], stopping=StoppingParams(max_new_tokens=0))
    short = StoppingParams(max_new_tokens=8)
    engine.add_request("dup", [5, 6], stopping=short)
    with pytest.raises(ValueError, match="already in flight"):
        engine.add_request("dup", [5, 6], stopping=short)


def test_seeded_sampling_is_batch_invariant(tiny_dir):
    engine = make_engine(tiny_dir, enable_prefix_caching=False)
    prompts = random_prompts(4, seed=8)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)
    alone = run_alone(engine, prompts[0], 16, seeded)
    assert run_alone(engine, prompts[0], 16, seeded) == alone
    engine.add_request("x", prompts[0], seeded, StoppingParams(max_new_tokens=16, ignore_eos=True))
    for i, prompt in enumerate(prompts[1:]):
        engine.add_request(f"o{i}", prompt, SamplingParams(temperature=1.0),
                           StoppingParams(max_new_tokens=16, ignore_eos=True))
    got = []
    while engine.has_work():
        got.extend(t for o in engine.step() if o.request_id == "x" for t in o.token_ids)
    assert got == alone


def test_preemption_does_not_push_out_an_accepted_request(tiny_dir):
    """A request accepted at the queue limit stays accepted when a preempted one re-queues."""
    engine = make_engine(tiny_dir, enable_prefix_caching=False, kv_capacity_tokens=128,
                         max_model_len=128, max_num_seqs=2, max_queue=1,
                         max_num_batched_tokens=256)
    long = StoppingParams(max_new_tokens=60, ignore_eos=True)
    engine.add_request("A", list(range(100, 160)), GREEDY, long)
    engine.step()
    engine.add_request("B", list(range(200, 260)), GREEDY, long)
    engine.step()
    finished = {}
    added_c = False
    for _ in range(400):
        if not added_c and engine.pool.num_free < len(engine.scheduler.running):
            engine.add_request("C", list(range(30, 40)), GREEDY, StoppingParams(max_new_tokens=4))
            added_c = True
        for out in engine.step():   # must not raise QueueFullError
            if out.finished:
                finished[out.request_id] = out.finish_reason
        if not engine.has_work():
            break
    assert added_c and engine.scheduler.num_preemptions > 0
    assert set(finished) == {"A", "B", "C"}
    assert engine.pool.is_idle()


def test_abort_frees_the_queue_place_at_once(tiny_dir):
    engine = make_engine(tiny_dir, max_queue=2)
    stopping = StoppingParams(max_new_tokens=4)
    engine.add_request("x", [5, 6], GREEDY, stopping)
    engine.add_request("y", [5, 7], GREEDY, stopping)
    engine.abort("x")
    assert not engine.is_live("x")
    engine.add_request("z", [5, 8], GREEDY, stopping)   # x's place is free before any step
    engine.abort("y")
    engine.add_request("x", [5, 9], GREEDY, stopping)   # and its id may be reused
    outputs = {}
    while engine.has_work():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    assert [o.finish_reason for o in outputs["x"] if o.finished] == [FinishReason.ABORTED,
                                                                     FinishReason.LENGTH]
    assert sum(len(o.token_ids) for o in outputs["x"]) == 4   # only the new x's tokens
    assert engine.pool.num_used == engine.prefix_cache.num_cached_tokens


def test_add_then_abort_before_the_loop_wakes(tiny_dir):
    """The engine loop's wait must not reorder queued commands (abort before its add)."""
    engine = make_engine(tiny_dir)
    engine.add_request("a", [5, 6, 7], GREEDY, StoppingParams(max_new_tokens=4))
    engine.abort("a")
    engine.wait_for_work(timeout=0.01)
    outputs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outputs] == [("a", FinishReason.ABORTED)]
    assert not engine.has_work() and engine.pool.is_idle()


def test_the_thread_governor_pauses_only_while_the_engine_waits(tiny_dir):
    """Idle time is not measured as contention: wait_for_work pauses the governor, steps don't."""
    threads = torch.get_num_threads()
    try:
        engine = make_engine(tiny_dir, cpu_threads=2, adaptive_threads=True)
        governor = engine.runner.thread_governor
        pauses = []
        governor.pause = lambda: pauses.append(engine.has_work())
        engine.add_request("a", [5, 6, 7], GREEDY, StoppingParams(max_new_tokens=3))
        engine.wait_for_work(timeout=0.01)      # work queued: returns at once, no pause
        assert pauses == []
        while engine.has_work():
            engine.step()
        engine.wait_for_work(timeout=0.01)      # nothing to run: the governor stops measuring
        assert pauses == [False]
    finally:
        torch.set_num_threads(threads)
