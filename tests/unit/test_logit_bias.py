"""logit_bias and min_tokens in the sampler and the request params: the bias lands on the right
rows and tokens before penalties and filters, in greedy and every sampling mode; rows without a
bias are untouched (and an all-greedy batch keeps its no-sort fast path); a min_tokens ban keeps
eos / stop ids out until enough tokens exist."""
from __future__ import annotations

import math

import pytest
import torch

from engine_svc.params import SamplingParams, StoppingParams
from engine_svc.sampler import Sampler, SamplerOutput, apply_logit_bias
from engine_svc.sequence import Sequence

CPU = torch.device("cpu")
VOCAB = 64
NEG_INF = float("-inf")
MODES = [  # greedy and every sampling mode, penalties included
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.0, repetition_penalty=1.5),
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=3),
    SamplingParams(temperature=1.2, top_p=0.5),
    SamplingParams(temperature=1.0, min_p=0.3),
    SamplingParams(temperature=1.0, presence_penalty=1.0, frequency_penalty=0.5, top_k=5),
]


def _sample(logits: torch.Tensor, params: list[SamplingParams], biases, seed: int = 0,
            outputs: list[list[int]] | None = None, top_logprobs: bool = False
            ) -> SamplerOutput:
    batch = logits.shape[0]
    generators = [torch.Generator(CPU).manual_seed(seed + i) for i in range(batch)]
    return Sampler(VOCAB, CPU, seed=seed)(
        logits, params, generators, [[1, 2, 3]] * batch,
        outputs if outputs is not None else [[4, 4, 5]] * batch,
        need_logprobs=top_logprobs, logit_bias=biases)


def _logits(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, VOCAB, generator=torch.Generator(CPU).manual_seed(seed)) * 3


def test_apply_logit_bias_adds_to_the_listed_rows_and_tokens_only() -> None:
    logits = _logits(3)
    biased = apply_logit_bias(logits, [{5: 2.5, 9: -1.0}, None, {0: NEG_INF}])
    want = logits.clone()
    want[0, 5] += 2.5
    want[0, 9] -= 1.0
    want[2, 0] = NEG_INF
    assert torch.equal(biased, want)
    assert torch.equal(logits, _logits(3))  # the input is not modified
    assert apply_logit_bias(logits, [None, {}, None]) is logits  # no bias: no copy


@pytest.mark.parametrize("params", MODES, ids=repr)
def test_plus_100_wins_and_a_ban_never_wins_in_every_mode(params: SamplingParams) -> None:
    logits = _logits(4, seed=1)
    weakest = logits.argmin(dim=-1).tolist()
    strongest = logits.argmax(dim=-1).tolist()
    for seed in range(25):
        boosted = _sample(logits, [params] * 4, [{w: 100.0} for w in weakest], seed)
        assert boosted.token_ids.tolist() == weakest, seed   # even past top-k / top-p / min-p
        banned = _sample(logits, [params] * 4, [{s: NEG_INF} for s in strongest], seed)
        assert all(t != s for t, s in zip(banned.token_ids.tolist(), strongest)), seed


def test_the_bias_comes_before_top_k() -> None:
    """The weakest token biased into the top of a top_k=1 row is the only candidate left."""
    logits = _logits(1, seed=2)
    weakest = int(logits.argmin())
    bias = {weakest: float(logits.max() - logits.min()) + 1.0}
    for seed in range(10):
        out = _sample(logits, [SamplingParams(temperature=1.0, top_k=1)], [bias], seed)
        assert out.token_ids.tolist() == [weakest]


def test_rows_without_bias_sample_as_if_no_row_had_one() -> None:
    logits = _logits(len(MODES), seed=3)
    plain = _sample(logits, MODES, None, seed=7)
    others = [None if i % 2 else {int(logits[i].argmax()): -50.0} for i in range(len(MODES))]
    mixed = _sample(logits, MODES, others, seed=7)
    unbiased = [i for i, b in enumerate(others) if b is None]
    assert mixed.token_ids[unbiased].tolist() == plain.token_ids[unbiased].tolist()
    biased = [i for i, b in enumerate(others) if b is not None]
    assert all(int(mixed.token_ids[i]) != int(logits[i].argmax()) for i in biased)


def test_greedy_with_bias_keeps_the_no_sort_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_sort(*args: object, **kwargs: object) -> None:
        raise AssertionError("an all-greedy batch must not sort")

    monkeypatch.setattr(torch.Tensor, "sort", no_sort)
    logits = _logits(3, seed=4)
    out = _sample(logits, [SamplingParams(temperature=0.0)] * 3, [{7: 100.0}, None, None])
    assert out.token_ids.tolist() == [7] + logits[1:].argmax(dim=-1).tolist()


def test_logprobs_see_the_bias_and_a_banned_token_is_never_an_alternative() -> None:
    logits = _logits(2, seed=5)
    best = int(logits[0].argmax())
    params = [SamplingParams(temperature=0.0, top_logprobs=5)] * 2
    out = _sample(logits, params, [{best: NEG_INF}, None], top_logprobs=True)
    assert best not in out.top_ids[0].tolist()
    want = torch.log_softmax(apply_logit_bias(logits, [{best: NEG_INF}, None]), dim=-1)
    assert out.logprobs.tolist() == pytest.approx(
        [float(want[r, int(out.token_ids[r])]) for r in range(2)], abs=1e-5)
    assert torch.exp(out.top_logprobs[0]).sum() <= 1.0 + 1e-5


def test_penalties_apply_after_the_bias() -> None:
    """A repetition penalty on a token biased to +100 still leaves it on top (and a banned,
    repeated token stays banned: -inf scaled is -inf)."""
    logits = _logits(1, seed=6)
    params = [SamplingParams(temperature=0.0, repetition_penalty=2.0)]
    out = _sample(logits, params, [{4: 100.0}], outputs=[[4, 4]])
    assert out.token_ids.tolist() == [4]
    best = int(logits.argmax())
    out = _sample(logits, params, [{best: NEG_INF}], outputs=[[best]])
    assert out.token_ids.tolist() != [best]


# ---- min_tokens: the per-step bias a sequence asks for ----------------------------------------
def _sequence(min_tokens: int, bias: dict[int, float] | None = None) -> Sequence:
    seq = Sequence("r", [1, 2], SamplingParams(logit_bias=bias or {}),
                   StoppingParams(max_new_tokens=10, stop_token_ids=[9], min_tokens=min_tokens))
    seq.stop_ids_banned = (2, 9) if min_tokens else ()
    return seq


def test_min_tokens_bans_stop_ids_until_enough_tokens_exist() -> None:
    seq = _sequence(3, {2: 5.0, 7: 1.5})
    for generated in range(3):
        assert seq.step_logit_bias() == {2: NEG_INF, 7: 1.5, 9: NEG_INF}, generated
        seq.output_ids.append(11)
    assert seq.step_logit_bias() == {2: 5.0, 7: 1.5}   # the 4th token may be eos
    assert _sequence(0).step_logit_bias() is None      # nothing to add: the row costs nothing
    assert _sequence(0, {4: -3.0}).step_logit_bias() == {4: -3.0}


# ---- validation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bias, message", [
    ({i: 1.0 for i in range(301)}, "logit_bias holds at most 300 entries, got 301"),
    ({3: 100.5}, "logit_bias[3] must be in [-100, 100], got 100.5"),
    ({3: math.nan}, "logit_bias[3] must be in [-100, 100], got nan"),
    ({3: math.inf}, "logit_bias[3] must be in [-100, 100], got inf"),
    ({VOCAB: 1.0}, f"logit_bias keys must be token ids in [0, {VOCAB}), got {VOCAB}"),
    ({-1: 1.0}, f"logit_bias keys must be token ids in [0, {VOCAB}), got -1"),
])
def test_bad_logit_bias_names_the_field(bias: dict[int, float], message: str) -> None:
    with pytest.raises(ValueError) as error:
        SamplingParams(logit_bias=bias).validate(VOCAB)
    assert str(error.value) == message
    SamplingParams(logit_bias={i: -100.0 for i in range(300)}).validate(1000)  # the limits


def test_min_tokens_must_fit_in_max_new_tokens() -> None:
    with pytest.raises(ValueError, match=r"min_tokens must be in \[0, max_new_tokens \(5\)\]"):
        StoppingParams(max_new_tokens=5, min_tokens=6).validate(VOCAB, 100)
    StoppingParams(max_new_tokens=5, min_tokens=5).validate(VOCAB, 100)
