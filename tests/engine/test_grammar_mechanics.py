"""Structured output mechanics on the tiny random model (with a tiny byte-level tokenizer): the
mask alone makes random logits follow the grammar; constrained and unconstrained rows share a
batch without changing each other; ends, logprobs, preemption, min_tokens, bad formats."""
from __future__ import annotations

import json
import math
import re
from dataclasses import replace

import pytest
from tokenizers import Tokenizer

from engine_svc.grammar import ResponseFormat
from engine_svc.params import FinishReason, SamplingParams, StoppingParams
from tests.engine.helpers import make_engine
from tests.fakes.tiny_tokenizer import byte_level_bpe

pytest.importorskip("xgrammar")
EOS = 2
REGEX = r"[a-c]{2,4}-[0-9]{1,3}"
CHOICES = ("red", "green", "blue sky", 'say "x"')
SCHEMA = {"type": "object", "properties": {"k": {"enum": ["p", "q"]},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["k", "n"]}
GRAMMAR = 'root ::= "<" [xy] [xy] ">"'


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tests.conftest import TINY_VOCAB, build_tiny_model

    path = build_tiny_model(tmp_path_factory.mktemp("tiny-grammar"), seed=5)
    byte_level_bpe(vocab_size=TINY_VOCAB).save(str(path / "tokenizer.json"))
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_dir) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))


def fmt(kind: str) -> ResponseFormat:
    return {"regex": ResponseFormat("regex", REGEX),
            "choice": ResponseFormat("choice", choices=CHOICES),
            "json_schema": ResponseFormat("json_schema", json.dumps(SCHEMA)),
            "grammar": ResponseFormat("grammar", GRAMMAR)}[kind]


def check_text(kind: str, text: str) -> None:
    if kind == "regex":
        assert re.fullmatch(REGEX, text), text
    elif kind == "choice":
        assert text in CHOICES, text
    elif kind == "json_schema":
        value = json.loads(text)
        assert value["k"] in ("p", "q") and 0 <= value["n"] <= 9 and set(value) == {"k", "n"}
    else:
        assert re.fullmatch(r"<[xy]{2}>", text), text


# (request id, kind or None, sampling): greedy and seeded, constrained and not, logprobs
REQUESTS = [
    ("free-greedy", None, SamplingParams(temperature=0.0)),
    ("regex-greedy", "regex", SamplingParams(temperature=0.0, top_logprobs=3)),
    ("free-seeded", None, SamplingParams(temperature=1.0, seed=3, top_logprobs=2)),
    ("choice-seeded", "choice", SamplingParams(temperature=1.2, seed=4)),
    ("json-seeded", "json_schema", SamplingParams(temperature=0.9, top_p=0.9, seed=5,
                                                   repetition_penalty=1.3)),
    ("grammar-greedy", "grammar", SamplingParams(temperature=0.0, top_logprobs=5)),
    ("regex-seeded", "regex", SamplingParams(temperature=1.5, top_k=20, seed=6)),
]


def with_format(kind: str | None, sampling: SamplingParams) -> SamplingParams:
    if kind is None:
        return sampling
    return replace(sampling, response_format=fmt(kind))


def prompt_of(index: int) -> list[int]:
    return [(29 * index + 7 * j) % 300 + 3 for j in range(4 + 2 * index)]


def drive(engine, indices: list[int], max_new_tokens: int = 24) -> dict[str, dict]:
    """Run REQUESTS[i] for i in indices together; per request: tokens, logprobs, reason."""
    results: dict[str, dict] = {}
    engine.largest_batch = 0
    stopping = StoppingParams(max_new_tokens=max_new_tokens)
    for index in indices:
        request_id, kind, sampling = REQUESTS[index]
        results[request_id] = {"tokens": [], "top": [], "logprobs": [], "reason": None}
        engine.add_request(request_id, prompt_of(index), with_format(kind, sampling), stopping)
    while engine.has_work():
        outputs = engine.step()
        engine.largest_batch = max(engine.largest_batch, engine.last_step.batch_size)
        for out in outputs:
            got = results[out.request_id]
            got["tokens"] += out.token_ids
            got["top"] += out.top_logprobs
            got["logprobs"] += out.logprobs
            if out.finished:
                got["reason"] = out.finish_reason
    return results


def assert_same(request_id: str, together: dict, alone: dict) -> None:
    """Tokens, reasons, alternative ids equal; logprobs equal up to batched float rounding."""
    assert together["tokens"] == alone["tokens"] and together["reason"] == alone["reason"], \
        request_id
    assert together["logprobs"] == pytest.approx(alone["logprobs"], abs=1e-4), request_id
    assert [[t for t, _ in top] for top in together["top"]] == \
        [[t for t, _ in top] for top in alone["top"]], request_id


def test_mixed_batch_rows_match_alone_and_follow_their_grammar(tiny_dir, tokenizer):
    engine = make_engine(tiny_dir)
    together = drive(engine, list(range(len(REQUESTS))))
    assert engine.largest_batch == len(REQUESTS) and engine.rows_held_by_requests() == 0
    for index, (request_id, kind, _) in enumerate(REQUESTS):
        alone = drive(engine, [index])[request_id]
        assert_same(request_id, together[request_id], alone)
        if kind is None:
            continue
        tokens = alone["tokens"]
        assert alone["reason"] is FinishReason.EOS and tokens[-1] == EOS, request_id
        check_text(kind, tokenizer.decode(tokens[:-1]))


def test_logprobs_and_alternatives_see_only_allowed_tokens(tiny_dir, tokenizer):
    engine = make_engine(tiny_dir)
    got = drive(engine, [5])["grammar-greedy"]  # "<" [xy] [xy] ">" then eos
    forced = [0, 3, 4]  # "<", ">" and the eos are the only tokens allowed there
    for position in forced:
        assert got["logprobs"][position] == pytest.approx(0.0, abs=1e-6)
        assert [t for t, _ in got["top"][position]] == [got["tokens"][position]]
    for position in (1, 2):  # x or y: two alternatives, probabilities over those two only
        alternatives = got["top"][position]
        assert {tokenizer.decode([t]) for t, _ in alternatives} == {"x", "y"}
        assert sum(math.exp(lp) for _, lp in alternatives) == \
            pytest.approx(1.0, abs=1e-5)


def test_grammar_end_is_eos_even_with_ignore_eos_and_beats_min_tokens(tiny_dir, tokenizer):
    engine = make_engine(tiny_dir)
    choice = SamplingParams(temperature=0.0, response_format=fmt("choice"))
    engine.add_request("ignore", prompt_of(1), choice,
                       StoppingParams(max_new_tokens=30, ignore_eos=True))
    engine.add_request("min", prompt_of(2), choice, StoppingParams(max_new_tokens=30,
                                                                   min_tokens=20))
    outputs = {"ignore": [], "min": []}
    reasons = {}
    while engine.has_work():
        for out in engine.step():
            outputs[out.request_id] += out.token_ids
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    assert reasons == {"ignore": FinishReason.EOS, "min": FinishReason.EOS}
    assert outputs["ignore"][-1] == EOS
    check_text("choice", tokenizer.decode(outputs["ignore"][:-1]))
    # min_tokens banned the eos the complete grammar needs: it ends there, no token outside it
    check_text("choice", tokenizer.decode(outputs["min"]))
    assert engine.rows_held_by_requests() == 0


def test_preempted_constrained_requests_resume_their_grammar(tiny_dir, tokenizer):
    prompts = [[(13 * i + 5 * j) % 300 + 3 for j in range(30)] for i in range(12)]
    sampling = SamplingParams(temperature=1.0, seed=9, response_format=fmt("regex"))
    stopping = StoppingParams(max_new_tokens=24)
    reference = make_engine(tiny_dir, enable_prefix_caching=False)
    alone = [reference.generate([p], sampling, stopping)[0] for p in prompts]
    tight = make_engine(tiny_dir, enable_prefix_caching=False, kv_capacity_tokens=200,
                        max_model_len=96, max_num_batched_tokens=96)
    assert tight.generate(prompts, sampling, stopping) == alone
    assert tight.scheduler.num_preemptions > 0 and tight.pool.is_idle()
    for tokens in alone:
        check_text("regex", tokenizer.decode(tokens[:-1]))


def test_bad_format_is_refused_at_admission_and_free_batches_allocate_no_mask(tiny_dir):
    engine = make_engine(tiny_dir)
    engine.generate([prompt_of(0)], SamplingParams(temperature=0.0),
                    StoppingParams(max_new_tokens=4))
    assert engine.runner.token_masks._bitmask is None  # no constrained row, no bitmask
    for bad, words in [(ResponseFormat("regex", "(a"), "response_format.regex: "),
                       (ResponseFormat("json_schema", '{"type": 3}'),
                        "response_format.json_schema: ")]:
        with pytest.raises(ValueError, match=re.escape(words)):
            engine.add_request("bad", prompt_of(0), SamplingParams(response_format=bad))
        assert not engine.has_work() and not engine.is_live("bad")
