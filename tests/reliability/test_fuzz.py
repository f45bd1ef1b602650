"""Hypothesis fuzzing of the public API (valid and invalid requests, extreme values, random
unicode prompts and chats, raw bytes): no call may end in a crash-like status, every refusal
names a field, and afterwards both services are SERVING, answer normally and hold no KV.
"""
from __future__ import annotations

import math
from collections import Counter

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmserve.v1 import generate_pb2
from tests.reliability.harness import SERVING, wait_pool_idle
from tests.reliability.messages import collect, text_request, text_stub

pytestmark = pytest.mark.timeout(300)

CALL_TIMEOUT_S = 10.0
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SMALL_FUZZ = settings(FUZZ, max_examples=60)
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ALREADY_EXISTS,
           grpc.StatusCode.DEADLINE_EXCEEDED}
FIELDS = ("prompt", "input", "chat", "sampling.", "stopping.", "top_logprobs", "request_id",
          "request:", "larger than max", "token_ids")
EDGE_FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 1e-45, -1e-45, 3.4e38, -3.4e38, 100.0, 100.5,
               math.nan, math.inf, -math.inf]
EDGE_UINT32 = [0, 1, 2, 20, 21, 511, 512, 49151, 49152, 2**31, 2**32 - 1]

texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200)
floats = st.one_of(st.sampled_from(EDGE_FLOATS), st.floats(width=32))
uint32 = st.one_of(st.sampled_from(EDGE_UINT32), st.integers(0, 2**32 - 1))
OUTCOMES: Counter = Counter()
roles = st.one_of(st.sampled_from(["system", "user", "assistant", "tool"]), texts)


@st.composite
def wild_sampling(draw) -> dict:
    """Any value the wire can carry, edge values often."""
    params = {}
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty"):
        if draw(st.booleans()):
            params[name] = draw(floats)
    if draw(st.booleans()):
        params["top_k"] = draw(uint32)
    if draw(st.booleans()):
        params["seed"] = draw(st.one_of(st.sampled_from([0, 2**63 - 1, 2**63, 2**64 - 1]),
                                        st.integers(0, 2**64 - 1)))
    return params


@st.composite
def valid_sampling(draw) -> dict:
    """Values inside every documented limit (the request must succeed)."""
    return {"temperature": draw(st.sampled_from([0.0, 0.0, 0.7, 1.0, 2.0])),
            "top_p": draw(st.sampled_from([1.0, 0.9, 0.05])),
            "top_k": draw(st.sampled_from([0, 1, 50, 2**32 - 1])),
            "min_p": draw(st.sampled_from([0.0, 0.1, 1.0])),
            "repetition_penalty": draw(st.sampled_from([1.0, 0.5, 1.3, 2.0])),
            "presence_penalty": draw(st.floats(-2.0, 2.0, width=32)),
            "frequency_penalty": draw(st.floats(-2.0, 2.0, width=32)),
            "seed": draw(st.integers(0, 2**63 - 1))}


@st.composite
def valid_requests(draw) -> generate_pb2.GenerateRequest:
    """Random unicode prompts / chats and sampling within the limits (<= 512 tokens in all)."""
    short = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1,
                    max_size=30)
    chat = (draw(st.lists(st.tuples(st.sampled_from(["system", "user", "assistant"]), short),
                          min_size=1, max_size=3)) if draw(st.booleans()) else None)
    prompt = None if chat else draw(texts.filter(bool).map(lambda t: t[:60]))
    return text_request(
        prompt, draw(st.one_of(st.none(), st.integers(1, 4))), chat=chat,
        top_logprobs=draw(st.integers(0, 20)), sampling=draw(valid_sampling()),
        stop=draw(st.lists(short.map(lambda t: t[:10]), max_size=3)),
        stop_token_ids=draw(st.lists(st.integers(0, 49151), max_size=3)),
        ignore_eos=draw(st.booleans()))


@st.composite
def wild_requests(draw) -> generate_pb2.GenerateRequest:
    """Anything: missing input, unknown roles, extreme numbers, too many stops, odd ids."""
    kind = draw(st.sampled_from(["prompt", "chat", "none"]))
    chat = draw(st.lists(st.tuples(roles, texts), max_size=4)) if kind == "chat" else None
    request = text_request(
        draw(texts) if kind == "prompt" else None,
        draw(st.one_of(st.none(), st.sampled_from([0, 1, 4, 12, 600, 2**32 - 1]))),
        chat=chat, request_id=draw(st.one_of(st.just(""), texts)),
        top_logprobs=draw(st.one_of(st.integers(0, 25), st.just(2**32 - 1))),
        sampling={"temperature": 0.0} | draw(wild_sampling()),
        stop=draw(st.lists(texts.filter(lambda s: len(s) < 40), max_size=18)),
        stop_token_ids=draw(st.lists(uint32, max_size=70)), ignore_eos=draw(st.booleans()))
    return request


@pytest.fixture(scope="module")
def channel(stack):
    with stack.tokenizer.channel() as channel:
        yield channel


@pytest.fixture(scope="module")
def log_starts(stack) -> dict[str, int]:
    return {proc.name: proc.log_size() for proc in (stack.engine, stack.tokenizer)}


def check_refusal(code: grpc.StatusCode, details: str) -> None:
    assert code in ALLOWED, (code, details)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert any(field in details for field in FIELDS), details


@FUZZ
@given(valid=st.booleans(), data=st.data())
def test_fuzzed_generate_never_breaks_the_service(channel, log_starts, valid, data) -> None:
    request = data.draw(valid_requests() if valid else wild_requests())
    outcome = collect(text_stub(channel).Generate(request, timeout=CALL_TIMEOUT_S))
    OUTCOMES[("valid" if valid else "wild", outcome.code.name)] += 1
    if valid:  # inside every limit: it must succeed
        assert outcome.code == grpc.StatusCode.OK, outcome.details
    check_refusal(outcome.code, outcome.details)
    if outcome.code == grpc.StatusCode.OK:
        assert outcome.finish_reason != generate_pb2.FINISH_REASON_UNSPECIFIED


@SMALL_FUZZ
@given(token_ids=st.lists(uint32, max_size=50), skip=st.booleans(), text=texts)
def test_fuzzed_tokenize_and_detokenize(channel, log_starts, token_ids, skip, text) -> None:
    stub = text_stub(channel)
    try:
        reply = stub.Detokenize(generate_pb2.DetokenizeRequest(
            token_ids=token_ids, skip_special_tokens=skip), timeout=CALL_TIMEOUT_S)
        assert all(token_id < 49152 for token_id in token_ids)
        assert isinstance(reply.text, str)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert "token_ids[" in error.details()
    ids = stub.Tokenize(generate_pb2.TokenizeRequest(text=text), timeout=CALL_TIMEOUT_S)
    assert len(ids.token_ids) <= len(text.encode()) + 2


@SMALL_FUZZ
@given(payload=st.binary(max_size=300))
def test_fuzzed_raw_bytes(channel, log_starts, payload) -> None:
    raw = channel.unary_stream("/llmserve.v1.TextGeneration/Generate",
                               request_serializer=bytes, response_deserializer=bytes)
    outcome = collect(raw(payload, timeout=CALL_TIMEOUT_S))
    check_refusal(outcome.code, outcome.details)


def test_after_fuzzing_both_services_are_healthy_and_idle(stack, channel, log_starts) -> None:
    print(f"\nfuzz outcomes: {dict(OUTCOMES)}")
    assert stack.engine.health() == SERVING and stack.tokenizer.health() == SERVING
    outcome = collect(text_stub(channel).Generate(text_request("Hello", 4), timeout=30))
    assert outcome.code == grpc.StatusCode.OK and len(outcome.token_ids) == 4
    state = wait_pool_idle(stack.engine, timeout=15)
    assert not any(state.values()), state
    for proc in (stack.engine, stack.tokenizer):
        assert proc.crash_lines(log_starts[proc.name]) == [], proc.name
