"""n samples of one prompt in the engine (tiny random model, fp32, CPU): one prefill whose pool
rows the n samples share by reference count, then each sample decodes on its own rows."""
from __future__ import annotations

from collections import defaultdict

import pytest

from engine_svc.engine import RequestOutput
from engine_svc.params import FinishReason, SamplingParams, StoppingParams
from engine_svc.sequence import SeqStatus
from engine_svc.stream_interval import StreamCoalescer
from tests.engine.helpers import GREEDY, make_engine

PROMPT = [(7 * j + 3) % 250 + 3 for j in range(40)]
SEEDED = SamplingParams(temperature=1.0, top_p=0.95, seed=100)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tests.conftest import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-n"), seed=9)


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return make_engine(tiny_dir)


def collect(engine, request_id: str = "r") -> dict[int, list]:
    """Step until idle: per sample index, its outputs in order."""
    outputs: dict[int, list] = defaultdict(list)
    while engine.has_work():
        for out in engine.step():
            assert out.request_id == request_id
            outputs[out.index].append(out)
    return outputs


def tokens(outputs: dict[int, list]) -> dict[int, list[int]]:
    return {index: [t for out in outs for t in out.token_ids] for index, outs in outputs.items()}


def test_n8_holds_the_prompt_once_and_one_row_per_generated_token(engine) -> None:
    new_tokens = 12
    engine.clear_prefix_cache()
    engine.step()
    assert engine.pool.is_idle()
    engine.add_request("r", PROMPT, SEEDED, StoppingParams(max_new_tokens=new_tokens,
                                                           ignore_eos=True), n=8)
    engine.step()                               # the prefill: every sample samples its 1st token
    assert engine.last_step.prompt_tokens == len(PROMPT)    # one prefill, not eight
    samples = engine._live["r"]
    assert [s.index for s in samples] == list(range(8))
    assert all(len(s.output_ids) == 1 for s in samples)
    usage = [engine.pool.num_used]
    prompt_rows = samples[0].rows[:len(PROMPT)]
    assert all((s.rows[:len(PROMPT)] == prompt_rows).all() for s in samples)
    assert engine.pool.ref_counts(prompt_rows).tolist() == [8 + 1] * len(PROMPT)  # + the cache
    while engine.has_work():
        engine.step()
        live = [s for s in samples if s.status is SeqStatus.RUNNING]
        if live:
            generated = {s.num_computed - len(PROMPT) for s in live}
            assert len(generated) == 1 and len(live) == 8
            usage.append(engine.pool.num_used)
            assert engine.rows_held_by_requests() == usage[-1]
    print(f"n=8, prompt {len(PROMPT)}: pool rows used after each step: {usage}")
    # g = generated tokens whose K/V are in the pool (the last token's never is)
    assert usage == [len(PROMPT) + 8 * g for g in range(new_tokens - 1)]
    engine.clear_prefix_cache()
    engine.step()
    assert engine.pool.is_idle()


def test_seeded_samples_are_reproducible_and_sample_i_uses_seed_plus_i(engine) -> None:
    stopping = StoppingParams(max_new_tokens=10, ignore_eos=True)
    engine.add_request("r", PROMPT, SEEDED, stopping, n=4)
    first = collect(engine)
    engine.add_request("r", PROMPT, SEEDED, stopping, n=4)
    assert tokens(collect(engine)) == tokens(first)
    alone = {}
    for i in range(4):
        engine.add_request("r", PROMPT, SamplingParams(temperature=1.0, top_p=0.95,
                                                       seed=100 + i), stopping)
        alone[i] = tokens(collect(engine))[0]
    assert tokens(first) == alone
    assert len({tuple(t) for t in alone.values()}) > 1    # different seeds, different samples
    for index, outs in first.items():
        final = outs[-1]
        assert [o.finish_reason for o in outs[:-1]] == [None] * (len(outs) - 1)
        assert final.finish_reason is FinishReason.LENGTH
        assert (final.prompt_tokens, final.completion_tokens) == (len(PROMPT), 10)
    assert engine.rows_held_by_requests() == 0


def test_greedy_samples_agree_and_end_on_their_own(engine) -> None:
    engine.add_request("r", PROMPT[:9], GREEDY, StoppingParams(max_new_tokens=6), n=3)
    outs = tokens(collect(engine))
    engine.add_request("r", PROMPT[:9], GREEDY, StoppingParams(max_new_tokens=6))
    alone = tokens(collect(engine))[0]
    assert outs == {0: alone, 1: alone, 2: alone}


def test_preempting_one_sample_keeps_the_rows_the_others_hold(tiny_dir) -> None:
    """A pool too small for 4 samples of 120 tokens after an 80-token prompt: the newest samples
    are preempted and recompute, and every sample still equals what it gives with room to
    spare."""
    roomy = make_engine(tiny_dir)
    tight = make_engine(tiny_dir, kv_capacity_tokens=300, max_model_len=256)
    stopping = StoppingParams(max_new_tokens=120, ignore_eos=True)
    for engine in (roomy, tight):
        engine.add_request("r", PROMPT * 2, SEEDED, stopping, n=4)
    want = tokens(collect(roomy))
    got: dict[int, list] = defaultdict(list)
    while tight.has_work():
        for out in tight.step():
            got[out.index].append(out)
        tight.pool.check_invariants()
        held = [s.rows for s in tight._live.get("r", []) if s.status is SeqStatus.RUNNING]
        for rows in held:   # a row a live sample holds is never free
            assert (tight.pool.ref_counts(rows) >= 1).all()
    assert tight.scheduler.num_preemptions > 0
    assert tokens(got) == want
    assert tight.rows_held_by_requests() == 0


def test_abort_one_sample_or_all(engine) -> None:
    stopping = StoppingParams(max_new_tokens=30, ignore_eos=True)
    engine.add_request("r", PROMPT, SEEDED, stopping, n=3)
    early = engine.step() + engine.step()
    engine.abort("r", index=1)
    outputs = collect(engine)
    for out in reversed(early):
        outputs[out.index].insert(0, out)
    assert outputs[1][-1].finish_reason is FinishReason.ABORTED
    assert [outputs[i][-1].finish_reason for i in (0, 2)] == [FinishReason.LENGTH] * 2
    assert len(tokens(outputs)[0]) == 30 and len(tokens(outputs)[1]) < 30
    engine.add_request("r", PROMPT, SEEDED, stopping, n=3)
    engine.abort("r")                   # before the prefill: the forks never start
    assert not engine.is_live("r")
    outputs = collect(engine)
    assert {i: [o.finish_reason for o in outs] for i, outs in outputs.items()} == {
        i: [FinishReason.ABORTED] for i in range(3)}
    assert engine.rows_held_by_requests() == 0


@pytest.mark.parametrize("n, message", [(0, "n must be in [1, 16], got 0"),
                                        (17, "n must be in [1, 16], got 17"),
                                        (16, "n (16) must be <= max_num_seqs (8)")])
def test_bad_n_is_refused_naming_the_field(tiny_dir, n: int, message: str) -> None:
    engine = make_engine(tiny_dir, max_num_seqs=8)
    with pytest.raises(ValueError) as error:
        engine.add_request("r", PROMPT, SEEDED, n=n)
    assert message in str(error.value)
    assert not engine.has_work()


def test_a_stream_interval_holds_each_sample_apart() -> None:
    coalescer = StreamCoalescer(interval=3)
    first = coalescer.push([RequestOutput("r", [1], index=0), RequestOutput("r", [2], index=1)])
    assert [(o.index, o.token_ids) for o in first] == [(0, [1]), (1, [2])]   # first tokens
    held = coalescer.push([RequestOutput("r", [3], index=0), RequestOutput("r", [4], index=1)])
    assert held == [] and coalescer.held_tokens == 2
    done = coalescer.push([RequestOutput("r", [5], index=1, finish_reason=FinishReason.EOS)])
    assert [(o.index, o.token_ids, o.finished) for o in done] == [(1, [4, 5], True)]
    assert [(o.index, o.token_ids) for o in coalescer.flush()] == [(0, [3])]


def test_n16_fits_a_pool_of_one_full_length_request(tiny_dir) -> None:
    """Alone, a request is never held back by the decode rows it keeps for its 16 forks: a
    prompt of nearly max_model_len on a pool of max_model_len rows still runs (the forks that
    do not fit are preempted and recompute their few tokens over the cached prompt)."""
    engine = make_engine(tiny_dir, kv_capacity_tokens=256, max_model_len=256, max_num_seqs=16)
    prompt = [(5 * j) % 250 + 3 for j in range(250)]
    engine.add_request("r", prompt, SEEDED, StoppingParams(max_new_tokens=4, ignore_eos=True),
                       n=16)
    outputs = collect(engine)
    assert {i: len(t) for i, t in tokens(outputs).items()} == {i: 4 for i in range(16)}
    assert engine.rows_held_by_requests() == 0
