"""A request resumed elsewhere (failover): the prompt plus the tokens so far, the rest of the
budget and num_generated_prompt_tokens continue exactly where the first engine stopped, seeded
sampling and penalties included; and requests past their deadline are dropped unprefilled."""
from __future__ import annotations

import time

import pytest

from engine_svc.params import FinishReason, SamplingParams, StoppingParams
from engine_svc.sampler import position_seed
from tests.engine.helpers import make_engine

NEW_TOKENS = 12
PROMPT = [(31 * j + 7) % 300 + 3 for j in range(9)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tests.conftest import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-resume"), num_kv_heads=2, seed=5)


def _run(engine, prompt: list[int], sampling: SamplingParams, max_new_tokens: int,
         generated: int = 0, neighbours: int = 0) -> list[int]:
    """The tokens of one request (beside `neighbours` unseeded sampled requests)."""
    stopping = StoppingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    engine.add_request("target", prompt, sampling, stopping, num_generated_prompt_tokens=generated)
    for i in range(neighbours):
        engine.add_request(f"n{i}", [5 + i] * (3 + i), SamplingParams(temperature=1.0),
                           StoppingParams(max_new_tokens=max_new_tokens + 3, ignore_eos=True))
    tokens: list[int] = []
    while engine.has_work():
        for out in engine.step():
            if out.request_id == "target":
                tokens.extend(out.token_ids)
    return tokens


SAMPLINGS = [
    SamplingParams(temperature=1.0, seed=123),
    SamplingParams(temperature=0.9, top_p=0.9, seed=7, presence_penalty=1.5,
                   frequency_penalty=0.8),
    SamplingParams(temperature=1.2, top_k=50, seed=99, repetition_penalty=1.3),
    SamplingParams(temperature=0.0, frequency_penalty=2.0),
]


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=repr)
@pytest.mark.parametrize("cut", [1, 5, 11])
def test_a_resumed_request_continues_the_uninterrupted_one(tiny_dir, sampling, cut) -> None:
    engine = make_engine(tiny_dir)
    whole = _run(engine, PROMPT, sampling, NEW_TOKENS)
    assert len(whole) == NEW_TOKENS
    # "another engine": a fresh one, busy with other requests, given the tokens so far
    other = make_engine(tiny_dir)
    rest = _run(other, PROMPT + whole[:cut], sampling, NEW_TOKENS - cut, generated=cut,
                neighbours=2)
    assert whole[:cut] + rest == whole


def test_generated_prompt_tokens_count_as_output_for_presence_penalties(tiny_dir) -> None:
    """Without the field, the resumed request treats the tokens as prompt and diverges."""
    sampling = SamplingParams(temperature=0.0, presence_penalty=2.0, frequency_penalty=2.0)
    engine = make_engine(tiny_dir)
    whole = _run(engine, PROMPT, sampling, NEW_TOKENS)
    cut = 6
    as_prompt = _run(engine, PROMPT + whole[:cut], sampling, NEW_TOKENS - cut, generated=0)
    as_output = _run(engine, PROMPT + whole[:cut], sampling, NEW_TOKENS - cut, generated=cut)
    assert whole[:cut] + as_output == whole
    assert as_prompt != as_output   # the penalty really depends on it (the test can tell)


def test_seeded_noise_depends_on_seed_and_position_only() -> None:
    seeds = {position_seed(s, p) for s in range(50) for p in range(50)}
    assert len(seeds) == 2500 and all(0 <= s < 2**63 for s in seeds)
    assert position_seed(7, 3) == position_seed(7, 3)
    assert position_seed(7, 3) != position_seed(8, 2)


def test_num_generated_prompt_tokens_is_validated(tiny_dir) -> None:
    engine = make_engine(tiny_dir)
    with pytest.raises(ValueError, match=r"num_generated_prompt_tokens must be in \[0, 3\)"):
        engine.add_request("bad", [4, 5, 6], SamplingParams(), StoppingParams(max_new_tokens=2),
                           num_generated_prompt_tokens=3)


def test_requests_past_their_deadline_are_dropped_before_prefill(tiny_dir) -> None:
    engine = make_engine(tiny_dir, max_num_seqs=2)
    stopping = StoppingParams(max_new_tokens=4, ignore_eos=True)
    now = time.monotonic()
    engine.add_request("live", PROMPT, SamplingParams(temperature=0.0), stopping,
                       deadline=now + 60)
    for i in range(6):   # expired already: none may cost a prefill
        engine.add_request(f"late-{i}", PROMPT[i:], SamplingParams(temperature=0.0), stopping,
                           n=2 if i == 0 else 1, deadline=now - 0.001)
    prompt_tokens, finished = 0, {}
    while engine.has_work():
        outputs = engine.step()
        prompt_tokens += engine.last_step.prompt_tokens
        for out in outputs:
            if out.finished:
                finished[(out.request_id, out.index)] = out.finish_reason
    assert prompt_tokens == len(PROMPT)   # only "live" was prefilled
    assert finished.pop(("live", 0)) is FinishReason.LENGTH
    assert set(finished) == {(f"late-{i}", 0) for i in range(6)} | {("late-0", 1)}
    assert set(finished.values()) == {FinishReason.ABORTED}
    assert engine.pool.num_used == engine.prefix_cache.num_cached_tokens
    assert not engine.is_live("late-0")


def test_a_running_request_past_its_deadline_ends_at_the_next_step(tiny_dir) -> None:
    engine = make_engine(tiny_dir)
    engine.add_request("r", PROMPT, SamplingParams(temperature=0.0),
                       StoppingParams(max_new_tokens=50, ignore_eos=True),
                       deadline=time.monotonic() + 0.3)
    outputs = engine.step()
    assert outputs and not outputs[-1].finished
    time.sleep(0.35)
    [out] = engine.step()
    assert out.finished and out.finish_reason is FinishReason.ABORTED and not out.token_ids
    assert not engine.has_work()
