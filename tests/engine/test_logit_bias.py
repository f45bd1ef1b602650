"""logit_bias and min_tokens through the engine on a tiny random model (fp32, CPU)."""
from __future__ import annotations

import pytest

from engine_svc.params import FinishReason, SamplingParams, StoppingParams
from tests.conftest import TINY_EOS_ID
from tests.engine.helpers import make_engine

PROMPT = [5, 17, 33, 8, 120, 64]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from tests.conftest import build_tiny_model

    return make_engine(build_tiny_model(tmp_path_factory.mktemp("tiny-bias"), seed=5))


def run(engine, sampling: SamplingParams, stopping: StoppingParams,
        prompt: list[int] = PROMPT) -> tuple[list[int], FinishReason]:
    request_id = f"r{id(sampling)}-{id(stopping)}"
    engine.add_request(request_id, prompt, sampling, stopping)
    tokens: list[int] = []
    reason = None
    while engine.has_work():
        for out in engine.step():
            assert out.request_id == request_id
            tokens.extend(out.token_ids)
            reason = out.finish_reason or reason
    assert engine.rows_held_by_requests() == 0
    return tokens, reason


def test_plus_100_forces_a_token_and_minus_100_bans_it(engine) -> None:
    stopping = StoppingParams(max_new_tokens=6, ignore_eos=True)
    plain, _ = run(engine, SamplingParams(temperature=0.0), stopping)
    forced, _ = run(engine, SamplingParams(temperature=0.0, logit_bias={77: 100.0}), stopping)
    assert forced == [77] * 6 and plain != forced
    banned, _ = run(engine, SamplingParams(temperature=0.0, logit_bias={plain[0]: -100.0}),
                    stopping)
    assert banned[0] != plain[0]
    for seed in range(3):  # and in a sampled mode with filters
        sampled = SamplingParams(temperature=1.0, top_p=0.9, top_k=20, seed=seed,
                                 logit_bias={123: 100.0})
        assert run(engine, sampled, stopping)[0] == [123] * 6


def test_min_tokens_holds_eos_and_stop_ids_back(engine) -> None:
    eager_eos = SamplingParams(temperature=0.0, logit_bias={TINY_EOS_ID: 100.0})
    tokens, reason = run(engine, eager_eos, StoppingParams(max_new_tokens=20))
    assert (tokens, reason) == ([TINY_EOS_ID], FinishReason.EOS)
    tokens, reason = run(engine, eager_eos, StoppingParams(max_new_tokens=20, min_tokens=4))
    assert reason is FinishReason.EOS and len(tokens) == 5 and tokens[-1] == TINY_EOS_ID
    assert TINY_EOS_ID not in tokens[:4]
    stop = SamplingParams(temperature=0.7, seed=3, logit_bias={42: 100.0})
    tokens, reason = run(engine, stop, StoppingParams(max_new_tokens=20, stop_token_ids=[42],
                                                      min_tokens=3))
    assert reason is FinishReason.STOP_TOKEN and len(tokens) == 4 and 42 not in tokens[:3]
    # ignore_eos: eos is no stop, so min_tokens does not ban it
    tokens, _ = run(engine, eager_eos, StoppingParams(max_new_tokens=3, min_tokens=3,
                                                      ignore_eos=True))
    assert tokens == [TINY_EOS_ID] * 3


def test_a_biased_request_beside_others_changes_nothing_for_them(engine) -> None:
    stopping = StoppingParams(max_new_tokens=8, ignore_eos=True)
    seeded = SamplingParams(temperature=0.9, top_k=30, seed=11)
    alone, _ = run(engine, seeded, stopping, PROMPT[:4])
    engine.add_request("plain", PROMPT[:4], seeded, stopping)
    engine.add_request("biased", PROMPT, SamplingParams(temperature=0.9, seed=12,
                       logit_bias={9: 100.0}), StoppingParams(max_new_tokens=8, min_tokens=8))
    got: dict[str, list[int]] = {"plain": [], "biased": []}
    while engine.has_work():
        for out in engine.step():
            got[out.request_id].extend(out.token_ids)
    assert got == {"plain": alone, "biased": [9] * 8}


def test_bad_bias_is_refused_naming_the_field(engine) -> None:
    vocab = engine.model_config.vocab_size
    with pytest.raises(ValueError, match=rf"logit_bias keys must be token ids in \[0, {vocab}\)"):
        engine.add_request("bad", PROMPT, SamplingParams(logit_bias={vocab: 1.0}))
    with pytest.raises(ValueError, match=r"min_tokens must be in \[0, max_new_tokens \(4\)\]"):
        engine.add_request("bad", PROMPT, stopping=StoppingParams(max_new_tokens=4, min_tokens=9))
    assert not engine.has_work()
