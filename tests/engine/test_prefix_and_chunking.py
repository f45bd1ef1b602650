"""Prefix caching through the engine, chunked prefill interleaved with decode, admission control."""
from __future__ import annotations

import pytest
import torch

from engine_svc.params import SamplingParams, StoppingParams
from engine_svc.scheduler import QueueFullError
from tests.engine.helpers import GREEDY, make_engine

STOP16 = StoppingParams(max_new_tokens=16, ignore_eos=True)
STOP8 = StoppingParams(max_new_tokens=8, ignore_eos=True)


def ids(count: int, seed: int, vocab: int) -> list[int]:
    return torch.randint(3, vocab, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


def run_one(engine, request_id: str, prompt: list[int], stopping=STOP16):
    engine.add_request(request_id, prompt, GREEDY, stopping)
    tokens, last = [], None
    while engine.has_work():
        for out in engine.step():
            tokens.extend(out.token_ids)
            last = out
    return tokens, last


def test_shared_200_token_prefix_is_reused_and_output_unchanged(default_model_dir):
    vocab = 49152
    prefix = ids(200, seed=1, vocab=vocab)
    first, second = prefix + ids(12, seed=2, vocab=vocab), prefix + ids(9, seed=3, vocab=vocab)
    cached = make_engine(default_model_dir, max_model_len=512)
    plain = make_engine(default_model_dir, max_model_len=512, enable_prefix_caching=False)
    tokens_a, out_a = run_one(cached, "a", first, STOP8)
    tokens_b, out_b = run_one(cached, "b", second, STOP8)
    assert out_a.cached_prompt_tokens == 0
    assert out_b.cached_prompt_tokens >= 190
    assert cached.scheduler.prefix_hit_tokens >= 190
    assert tokens_a == run_one(plain, "a", first, STOP8)[0]
    assert tokens_b == run_one(plain, "b", second, STOP8)[0]
    # with every request ended only the tree holds rows; clearing it empties the pool
    assert cached.pool.num_used == cached.prefix_cache.num_cached_tokens > 0
    cached.prefix_cache.clear()
    assert cached.pool.is_idle()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tests.conftest import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny"), num_kv_heads=2, seed=11)


def test_cache_hits_under_eviction_pressure_stay_correct(tiny_dir):
    """Many requests sharing prefixes in a small pool: evictions happen, outputs never change."""
    base = [ids(40, seed=s, vocab=320) for s in range(3)]
    prompts = [base[i % 3] + ids(5 + i, seed=100 + i, vocab=320) for i in range(18)]
    plain = make_engine(tiny_dir, enable_prefix_caching=False)
    expected = [run_one(plain, f"p{i}", p)[0] for i, p in enumerate(prompts)]
    small = make_engine(tiny_dir, kv_capacity_tokens=200, max_model_len=128, max_num_seqs=4,
                        max_num_batched_tokens=64)
    got = small.generate(prompts, GREEDY, STOP16)
    assert got == expected
    assert small.scheduler.prefix_hit_tokens > 0
    small.pool.check_invariants()
    assert small.pool.num_used == small.prefix_cache.num_cached_tokens


def test_long_prompt_is_chunked_while_decodes_keep_running(tiny_dir):
    engine = make_engine(tiny_dir, enable_prefix_caching=False, max_num_batched_tokens=32,
                         max_num_seqs=16, max_model_len=512)
    for i in range(8):
        engine.add_request(f"d{i}", ids(6, seed=i, vocab=320), GREEDY,
                           StoppingParams(max_new_tokens=80, ignore_eos=True))
    for _ in range(3):
        engine.step()
    engine.add_request("long", ids(400, seed=99, vocab=320), GREEDY, STOP16)
    long_seq = engine._live["long"][0]   # sample 0 (the only one)
    steps_with_long = 0
    while long_seq.num_computed < 400:
        engine.step()
        stats = engine.last_step
        assert stats.num_tokens <= engine.scheduler.config.max_num_batched_tokens
        if stats.prompt_tokens:
            steps_with_long += 1
            assert stats.batch_size == 9      # all 8 decodes rode along with the chunk
    assert steps_with_long >= 400 // (32 - 8)
    assert long_seq.output_ids  # and it produced its first token once the prompt was in


def test_queue_limit_rejects_fast(tiny_dir):
    engine = make_engine(tiny_dir, max_queue=3)
    for i in range(3):
        engine.add_request(f"q{i}", [5, 6, 7], GREEDY, STOP16)
    with pytest.raises(QueueFullError, match="queue is full"):
        engine.add_request("q3", [5, 6, 7], GREEDY, STOP16)
    while engine.has_work():
        engine.step()
    engine.add_request("q4", [5, 6, 7], GREEDY, STOP16)  # room again once the queue drains


def test_seeded_sampling_unchanged_by_cache_hit(tiny_dir):
    engine = make_engine(tiny_dir)
    prompt = ids(50, seed=5, vocab=320)
    seeded = SamplingParams(temperature=0.8, top_k=40, seed=42)
    stopping = StoppingParams(max_new_tokens=12, ignore_eos=True)
    cold = engine.generate([prompt], seeded, stopping)[0]
    warm = engine.generate([prompt], seeded, stopping)[0]
    assert engine.scheduler.prefix_hit_tokens >= 49
    assert cold == warm


def test_rows_held_by_requests_excludes_cache_only_rows(tiny_dir):
    engine = make_engine(tiny_dir)
    prompt = ids(30, seed=9, vocab=320)
    engine.generate([prompt], GREEDY, STOP8)
    assert engine.pool.num_used > 0 and engine.rows_held_by_requests() == 0
    engine.add_request("again", prompt + [7, 8], GREEDY, STOP8)
    engine.step()
    seq = engine._live["again"][0]   # sample 0 (the only one)
    # it holds every computed row, some of them shared with the tree (counted once)
    assert engine.rows_held_by_requests() == seq.num_computed
    engine.add_request("twin", prompt + [7, 9], GREEDY, STOP8)
    engine.step()
    held = {int(r) for s in engine.scheduler.running for r in s.rows}
    assert engine.rows_held_by_requests() == len(held)
    engine.abort("again")
    engine.abort("twin")
    engine.step()
    assert engine.rows_held_by_requests() == 0
