"""Sampler: greedy, penalties vs a naive per-row computation, seeded reproducibility across
batches, top-k/top-p/min-p support (property-based), sampling distribution, logprobs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine_svc.params import SamplingParams
from engine_svc.sampler import Sampler, SamplerOutput, apply_penalties, mask_top_k_top_p

CPU = torch.device("cpu")


def _run(sampler: Sampler, logits: torch.Tensor, params: list[SamplingParams],
         generators: list[torch.Generator | None] | None = None,
         prompts: list[list[int]] | None = None,
         outputs: list[list[int]] | None = None) -> SamplerOutput:
    batch = logits.shape[0]
    return sampler(logits, params,
                   generators if generators is not None else [None] * batch,
                   prompts if prompts is not None else [[] for _ in range(batch)],
                   outputs if outputs is not None else [[] for _ in range(batch)])


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator(CPU).manual_seed(seed)


def _random_tokens(rng: np.random.Generator, vocab: int, max_len: int) -> list[int]:
    # Draw from a small slice of the vocab so that tokens repeat (frequency counts > 1).
    return rng.integers(0, min(vocab, 12), size=rng.integers(0, max_len + 1)).tolist()


def _naive_penalties(row: torch.Tensor, params: SamplingParams, prompt: list[int],
                     output: list[int]) -> torch.Tensor:
    """Per-token Python loop: the textbook definition of the three penalties."""
    values = row.tolist()
    for token in set(prompt) | set(output):
        value = values[token]
        p = params.repetition_penalty
        values[token] = value / p if value > 0 else value * p
    for token in set(output):
        count = output.count(token)
        values[token] -= params.presence_penalty + params.frequency_penalty * count
    return torch.tensor(values, dtype=torch.float32)


def test_greedy_is_argmax_and_takes_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_sort(*args: object, **kwargs: object) -> None:
        raise AssertionError("the all-greedy batch must not sort")

    monkeypatch.setattr(torch.Tensor, "sort", no_sort)
    monkeypatch.setattr(torch, "sort", no_sort)
    logits = torch.randn(6, 50, generator=_seeded(0)).to(torch.bfloat16)
    out = _run(Sampler(50, CPU), logits, [SamplingParams(temperature=0.0)] * 6)
    assert out.token_ids.dtype == torch.int64
    assert torch.equal(out.token_ids, logits.float().argmax(dim=-1))
    assert out.top_ids is None and out.top_logprobs is None


@pytest.mark.parametrize("kind", ["repetition", "presence_frequency", "all"])
def test_penalties_match_naive_computation(kind: str) -> None:
    vocab, batch = 40, 8
    rng = np.random.default_rng(1)
    logits = torch.randn(batch, vocab, generator=_seeded(1)) * 3
    params = []
    for i in range(batch):
        rep = float(rng.uniform(0.5, 2.0)) if kind != "presence_frequency" else 1.0
        pres, freq = (rng.uniform(-2, 2, size=2).tolist() if kind != "repetition"
                      else (0.0, 0.0))
        # Every third row has no penalty at all (mixed batch).
        params.append(SamplingParams(temperature=0.0) if i % 3 == 2 else SamplingParams(
            temperature=0.0, repetition_penalty=rep, presence_penalty=pres,
            frequency_penalty=freq))
    prompts = [_random_tokens(rng, vocab, 10) for _ in range(batch)]
    outputs = [_random_tokens(rng, vocab, 10) for _ in range(batch)]
    expected = torch.stack([_naive_penalties(logits[i], params[i], prompts[i], outputs[i])
                            for i in range(batch)])
    penalised = apply_penalties(logits, params, prompts, outputs)
    torch.testing.assert_close(penalised, expected)
    assert (penalised != logits).any()  # the penalties did something
    out = _run(Sampler(vocab, CPU), logits, params, prompts=prompts, outputs=outputs)
    assert torch.equal(out.token_ids, expected.argmax(dim=-1))


def test_penalty_token_out_of_range_is_rejected() -> None:
    params = [SamplingParams(temperature=0.0, frequency_penalty=1.0)]
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 10\)"):
        _run(Sampler(10, CPU), torch.zeros(1, 10), params, outputs=[[3, 10]])


def _decode(sampler: Sampler, logits: torch.Tensor, target: SamplingParams, seed: int,
            position: int, neighbours: list[SamplingParams], steps: int) -> list[int]:
    """Run `steps` steps with the seeded target row at `position` among `neighbours`."""
    generator = _seeded(seed)
    tokens: list[int] = []
    for step in range(steps):
        rows = list(neighbours)
        rows.insert(position, target)
        gens: list[torch.Generator | None] = [
            _seeded(1000 + i) if p.seed is not None else None for i, p in enumerate(rows)]
        gens[position] = generator
        batch_logits = torch.randn(len(rows), logits.shape[1], generator=_seeded(500 + step))
        batch_logits[position] = logits[step]
        outputs = [[] for _ in rows]
        outputs[position] = tokens.copy()
        out = _run(sampler, batch_logits, rows, gens, outputs=outputs)
        tokens.append(int(out.token_ids[position]))
    return tokens


@pytest.mark.parametrize("target", [
    SamplingParams(temperature=0.9, seed=7),
    SamplingParams(temperature=1.3, top_p=0.9, top_k=30, min_p=0.02, seed=7),
    SamplingParams(temperature=1.0, repetition_penalty=1.3, frequency_penalty=0.5, seed=7),
])
def test_seeded_row_is_reproducible_across_batches(target: SamplingParams) -> None:
    vocab, steps = 64, 12
    logits = torch.randn(steps, vocab, generator=_seeded(3))
    alone = _decode(Sampler(vocab, CPU), logits, target, 7, 0, [], steps)
    assert alone == _decode(Sampler(vocab, CPU), logits, target, 7, 0, [], steps)
    assert len(set(alone)) > 1  # it is actually random, not stuck on one token
    busy = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.0),
            SamplingParams(top_p=0.5, presence_penalty=1.0),
            SamplingParams(top_k=3, min_p=0.1, seed=99), SamplingParams(temperature=2.0)]
    for position in (0, 2, 5):
        assert _decode(Sampler(vocab, CPU), logits, target, 7, position, busy, steps) == alone
    other_seed = _decode(Sampler(vocab, CPU), logits, target, 8, 0, [], steps)
    assert other_seed != alone


def _allowed_tokens(logits: torch.Tensor, params: SamplingParams) -> set[int]:
    """Naive float64 support of top-k -> top-p -> min-p, lenient at float32 boundaries."""
    scaled = logits.double() / params.temperature
    order = sorted(range(len(scaled)), key=lambda t: -float(scaled[t]))
    kept = order[:params.top_k] if params.top_k > 0 else order
    weights = [math.exp(float(scaled[t] - scaled[order[0]])) for t in kept]
    total = sum(weights)
    allowed, mass = [], 0.0
    for token, weight in zip(kept, weights):
        if params.top_p < 1.0 and mass >= params.top_p + 1e-4:
            break
        allowed.append((token, weight))
        mass += weight / total
    return {t for t, w in allowed if w >= params.min_p * (1 - 1e-4)}


@st.composite
def _filter_params(draw: st.DrawFn) -> SamplingParams:
    return SamplingParams(
        temperature=draw(st.floats(0.1, 2.0)),
        top_k=draw(st.integers(0, 12)),
        top_p=draw(st.one_of(st.just(1.0), st.floats(0.01, 1.0))),
        min_p=draw(st.one_of(st.just(0.0), st.floats(0.0, 1.0))),
        seed=draw(st.one_of(st.none(), st.integers(0, 2**32))))


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(_filter_params(), min_size=1, max_size=4),
       vocab=st.integers(2, 40), logit_seed=st.integers(0, 2**16),
       scale=st.floats(0.1, 8.0))
def test_filters_never_emit_a_dropped_token(rows: list[SamplingParams], vocab: int,
                                            logit_seed: int, scale: float) -> None:
    copies = 16  # each row repeated to see many draws per example
    params = [p for p in rows for _ in range(copies)]
    gens = [None if p.seed is None else _seeded(p.seed + i) for i, p in enumerate(params)]
    base = torch.randn(len(rows), vocab, generator=_seeded(logit_seed)) * scale
    logits = base.repeat_interleave(copies, dim=0)
    out = _run(Sampler(vocab, CPU, seed=logit_seed), logits, params, gens)
    for i, p in enumerate(params):
        assert int(out.token_ids[i]) in _allowed_tokens(logits[i], p), (i, p)


def test_top_k_one_equals_greedy(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_sort(*args: object, **kwargs: object) -> None:
        raise AssertionError("rows that all have a top_k need a topk, not a full sort")

    monkeypatch.setattr(torch.Tensor, "sort", no_sort)
    logits = torch.randn(32, 100, generator=_seeded(4)) * 2
    params = [SamplingParams(temperature=t if i % 4 else 0.0, top_k=1 if i % 8 else 0, seed=i)
              for i, t in enumerate(np.linspace(0.2, 3.0, 32).tolist())]
    gens = [_seeded(i) if i % 2 else None for i in range(32)]
    out = _run(Sampler(100, CPU), logits, params, gens)
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))


def test_top_k_window_matches_full_sort() -> None:
    scores = torch.randn(6, 80, generator=_seeded(6)) * 3
    top_k = torch.tensor([1, 5, 17, 17, 9, 2])
    top_p = torch.tensor([1.0, 0.5, 0.9, 1.0, 0.2, 0.99])
    full = mask_top_k_top_p(scores, top_k, top_p, candidates=80)
    assert torch.equal(mask_top_k_top_p(scores, top_k, top_p, candidates=17), full)
    kept = torch.isfinite(full)
    assert torch.equal(kept.sum(dim=-1)[[0, 3]], torch.tensor([1, 17]))
    assert torch.equal(full[kept], scores[kept])  # survivors keep their value


def _chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=len(probs)).double()
    expected = probs.double() * len(tokens)
    support = expected > 0
    assert counts[~support].sum() == 0  # zero-probability tokens never drawn
    return float(((counts[support] - expected[support]) ** 2 / expected[support]).sum())


@pytest.mark.parametrize("params, seeded, neighbour", [
    (SamplingParams(temperature=1.0), False, None),
    (SamplingParams(temperature=0.5), False, SamplingParams(temperature=0.0)),
    (SamplingParams(temperature=1.0, top_k=4), False, SamplingParams(top_k=2)),
    (SamplingParams(temperature=1.5, top_p=0.8, min_p=0.1), False, None),
    (SamplingParams(temperature=1.0), True, None),
])
def test_sampling_distribution_matches_softmax(params: SamplingParams, seeded: bool,
                                               neighbour: SamplingParams | None) -> None:
    draws = 20000 if not seeded else 3000
    row = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -1.5])
    rows = [params] * draws if neighbour is None else [params, neighbour] * (draws // 2)
    logits = row.expand(len(rows), -1).contiguous()
    gens = [_seeded(i) for i in range(len(rows))] if seeded else None
    out = _run(Sampler(6, CPU, seed=11), logits, rows, gens)
    target_rows = torch.tensor([p is params for p in rows])
    allowed = torch.zeros(6, dtype=torch.bool)
    allowed[list(_allowed_tokens(row, params))] = True
    expected = (row / params.temperature).masked_fill(~allowed, -math.inf).softmax(dim=-1)
    # 5 degrees of freedom at most: P(chi2 > 30) ~ 1.5e-5.
    assert _chi_square(out.token_ids[target_rows], expected) < 30.0


def test_logprobs_are_raw_log_softmax() -> None:
    vocab, batch = 30, 5
    logits = torch.randn(batch, vocab, generator=_seeded(5)) * 4
    params = [SamplingParams(temperature=0.0, top_logprobs=3),
              SamplingParams(temperature=0.7, top_k=5, repetition_penalty=1.8, top_logprobs=5),
              SamplingParams(temperature=1.0, top_p=0.3),
              SamplingParams(temperature=0.0, presence_penalty=2.0, top_logprobs=1),
              SamplingParams(temperature=2.0, min_p=0.3, seed=1)]
    prompts = [[1, 2, 3]] * batch
    outputs = [[int(logits[i].argmax())] for i in range(batch)]
    out = _run(Sampler(vocab, CPU), logits, params, prompts=prompts, outputs=outputs)
    expected = logits.log_softmax(dim=-1)
    torch.testing.assert_close(out.logprobs, expected.gather(1, out.token_ids[:, None])[:, 0])
    assert out.top_ids is not None and out.top_logprobs is not None
    assert out.top_ids.shape == (batch, 5) and out.top_logprobs.dtype == torch.float32
    torch.testing.assert_close(out.top_logprobs, expected.topk(5, dim=-1).values)
    torch.testing.assert_close(out.top_logprobs, expected.gather(1, out.top_ids))
    assert (out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all()


def test_padded_vocab_columns_are_never_sampled() -> None:
    logits = torch.zeros(4, 12)
    logits[:, 10:] = 100.0  # padding columns past vocab_size=10
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0),
              SamplingParams(top_p=0.5), SamplingParams(temperature=0.0, top_logprobs=20)]
    out = _run(Sampler(10, CPU), logits, params)
    assert (out.token_ids < 10).all()
    assert out.top_ids is not None and out.top_ids.shape == (4, 10)
    torch.testing.assert_close(out.logprobs, torch.full((4,), -math.log(10)))


def test_bad_batch_shapes_are_rejected() -> None:
    sampler = Sampler(10, CPU)
    with pytest.raises(ValueError, match="generators"):
        sampler(torch.zeros(2, 10), [SamplingParams()] * 2, [None], [[], []], [[], []])
    with pytest.raises(ValueError, match="vocab_size=10"):
        _run(sampler, torch.zeros(2, 9), [SamplingParams()] * 2)
    with pytest.raises(ValueError, match=r"\[batch, vocab\]"):
        sampler(torch.zeros(10), [SamplingParams()], [None], [[]], [[]])


def test_logprobs_skipped_when_not_needed_but_tokens_unchanged() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(3))
    params = [SamplingParams(temperature=0.0)] * 3
    args = (logits, params, [None] * 3, [[1]] * 3, [[]] * 3)
    full = Sampler(50, torch.device("cpu"), seed=0)(*args)
    lean = Sampler(50, torch.device("cpu"), seed=0)(*args, need_logprobs=False)
    assert torch.equal(full.token_ids, lean.token_ids)
    assert lean.logprobs is None and full.logprobs is not None
    wants_top = [SamplingParams(temperature=0.0, top_logprobs=2)] + params[1:]
    forced = Sampler(50, torch.device("cpu"), seed=0)(logits, wants_top, *args[2:],
                                                       need_logprobs=False)
    assert forced.logprobs is not None and forced.top_ids.shape == (3, 2)
