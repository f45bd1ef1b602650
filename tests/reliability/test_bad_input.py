"""Bad input, table-driven, against both real services: the right status code, a message naming
the field and its limit, and the service answers the next request exactly as before.

Decisions this file pins down:
- top_k is a uint32, so negative values are not expressible; top_k >= vocab_size keeps every
  token, i.e. it behaves exactly like 0 (off) -- accepted, not an error.
- Detokenize of ids whose bytes are not valid UTF-8 returns U+FFFD for them (lossy, like
  Hugging Face `decode`), not an error.
- A request whose bytes do not parse (bad UTF-8 in a string field) is INVALID_ARGUMENT.
- A message over --max-message-bytes is RESOURCE_EXHAUSTED, from gRPC itself.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import grpc
import pytest

from llmserve.v1 import generate_pb2
from tests.reliability.conftest import SHARED_MAX_MESSAGE_BYTES
from tests.reliability.harness import wait_pool_idle
from tests.reliability.messages import (collect, engine_request, engine_stub, text_request,
                                        text_stub)

pytestmark = pytest.mark.timeout(300)

VOCAB = 49152  # SmolLM2
INVALID = grpc.StatusCode.INVALID_ARGUMENT
TOO_BIG = grpc.StatusCode.RESOURCE_EXHAUSTED
NAN, INF = float("nan"), float("inf")
BIG_IDS = [10000] * (SHARED_MAX_MESSAGE_BYTES // 2)  # 2 varint bytes each: over the limit
UNPARSABLE_PROMPT = b"\x12\x03\xff\xfeA"  # field 2 (prompt), 3 bytes that are not UTF-8


@dataclass(frozen=True)
class Case:
    """One bad request: which RPC, the request, the expected code and message fragments."""

    rpc: str  # "generate", "tokenize", "detokenize", "raw_generate" or "engine"
    request: Callable[[], object]
    code: grpc.StatusCode
    needles: tuple[str, ...]  # the field and its limit, as the message must say them


def gen(needles: tuple[str, ...], code: grpc.StatusCode = INVALID, **kwargs) -> Case:
    return Case("generate", lambda: text_request(**kwargs), code, needles)


def sampled(field: str, value: float | int, *needles: str) -> Case:
    return gen((f"sampling.{field}", *needles), sampling={"temperature": 1.0, field: value})


def eng(needles: tuple[str, ...], code: grpc.StatusCode = INVALID, **kwargs) -> Case:
    return Case("engine", lambda: engine_request(**kwargs), code, needles)


CASES: dict[str, Case] = {
    "empty_prompt": gen(("prompt", "empty"), prompt=""),
    "no_prompt_nor_chat": gen(("input", "prompt or chat"), prompt=None),
    "prompt_over_context": gen(("prompt is", "at most 511", "max_model_len 512"),
                               prompt="hello " * 600),
    "max_new_tokens_0": gen(("stopping.max_new_tokens", ">= 1"), max_new_tokens=0),
    "max_new_tokens_over_room": gen(("stopping.max_new_tokens", "max_model_len 512"),
                                    max_new_tokens=600),
    "max_new_tokens_uint32_max": gen(("stopping.max_new_tokens", "max_model_len 512"),
                                     max_new_tokens=2**32 - 1),
    "temperature_negative": sampled("temperature", -0.5, "[0, 100]"),
    "temperature_nan": sampled("temperature", NAN, "finite"),
    "temperature_inf": sampled("temperature", INF, "finite"),
    "temperature_over_100": sampled("temperature", 101.0, "[0, 100]"),
    "top_p_0": sampled("top_p", 0.0, "(0, 1]"),
    "top_p_over_1": sampled("top_p", 1.5, "(0, 1]"),
    "top_p_nan": sampled("top_p", NAN, "finite"),
    "min_p_negative": sampled("min_p", -0.1, "[0, 1]"),
    "min_p_over_1": sampled("min_p", 1.5, "[0, 1]"),
    "repetition_penalty_0": sampled("repetition_penalty", 0.0, "(0, 2]"),
    "repetition_penalty_3": sampled("repetition_penalty", 3.0, "(0, 2]"),
    "presence_penalty_low": sampled("presence_penalty", -2.5, "[-2, 2]"),
    "frequency_penalty_high": sampled("frequency_penalty", 2.5, "[-2, 2]"),
    "frequency_penalty_nan": sampled("frequency_penalty", NAN, "finite"),
    "seed_2_63": sampled("seed", 2**63, "[0, 2^63)"),
    "seed_uint64_max": sampled("seed", 2**64 - 1, "[0, 2^63)"),
    "top_logprobs_21": gen(("top_logprobs", "[0, 20]"), top_logprobs=21),
    "stop_17_strings": gen(("stopping.stop", "at most 16"), stop=[f"s{i}" for i in range(17)]),
    "stop_empty_string": gen(("stopping.stop[1]", "empty"), stop=["x", ""]),
    "stop_string_257_chars": gen(("stopping.stop[0]", "at most 256"), stop=["s" * 257]),
    "stop_token_id_vocab": gen(("stopping.stop_token_ids[0]", f"[0, {VOCAB})"),
                               stop_token_ids=[VOCAB]),
    "stop_token_ids_65": gen(("stopping.stop_token_ids", "at most 64"),
                             stop_token_ids=list(range(65))),
    "chat_unknown_role": gen(("chat.messages[1].role", "system, user, assistant, tool"),
                             chat=[("user", "hi"), ("wizard", "abracadabra")]),
    "chat_empty_role": gen(("chat.messages[0].role", "one of"), chat=[("", "hi")]),
    "chat_empty": gen(("chat.messages", "at least 1"), chat=[]),
    "request_id_129_chars": gen(("request_id", "at most 128"), request_id="r" * 129),
    "request_id_line_break": gen(("request_id", "printable"), request_id="a\nb"),
    "prompt_over_message_limit": gen(("larger than max", str(SHARED_MAX_MESSAGE_BYTES)),
                                     TOO_BIG, prompt="x" * (SHARED_MAX_MESSAGE_BYTES + 10)),
    "prompt_not_utf8": Case("raw_generate", lambda: UNPARSABLE_PROMPT, INVALID,
                            ("request", "UTF-8")),
    "tokenize_over_message_limit": Case(
        "tokenize", lambda: generate_pb2.TokenizeRequest(text="y" * SHARED_MAX_MESSAGE_BYTES),
        TOO_BIG, ("larger than max", str(SHARED_MAX_MESSAGE_BYTES))),
    "detokenize_id_vocab": Case(
        "detokenize", lambda: generate_pb2.DetokenizeRequest(token_ids=[1, VOCAB]), INVALID,
        ("token_ids[1]", f"[0, {VOCAB})")),
    "detokenize_over_message_limit": Case(
        "detokenize", lambda: generate_pb2.DetokenizeRequest(token_ids=BIG_IDS), TOO_BIG,
        ("larger than max",)),
    "engine_empty_token_list": eng(("prompt_token_ids", "at least 1"), prompt_ids=[]),
    "engine_token_id_vocab": eng(("prompt_token_ids", f"[0, {VOCAB})"),
                                 prompt_ids=[1, 2, VOCAB]),
    "engine_token_id_uint32_max": eng(("prompt_token_ids", f"[0, {VOCAB})"),
                                      prompt_ids=[2**32 - 1]),
    "engine_max_new_tokens_0": eng(("max_new_tokens", "[1, 512]"), max_new_tokens=0),
    "engine_over_context": eng(("max_new_tokens (100)", "max_model_len (512)"),
                               prompt_ids=[5] * 500, max_new_tokens=100),
    "engine_temperature_nan": eng(("temperature", "finite"), sampling={"temperature": NAN}),
    "engine_top_p_0": eng(("top_p", "(0, 1]"), sampling={"top_p": 0.0}),
    "engine_top_logprobs_21": eng(("top_logprobs", "[0, 20]"), top_logprobs=21),
    "engine_seed_2_63": eng(("seed", "[0, 2^63)"), sampling={"seed": 2**63}),
    "engine_stop_token_id_vocab": eng(("stop_token_ids", f"[0, {VOCAB})"),
                                      stop_token_ids=[VOCAB]),
    "engine_stop_token_ids_65": eng(("stop_token_ids", "at most 64"),
                                    stop_token_ids=list(range(65))),
    "engine_request_id_129_chars": eng(("request_id", "at most 128"), request_id="e" * 129),
    "engine_over_message_limit": eng(("larger than max", str(SHARED_MAX_MESSAGE_BYTES)),
                                     TOO_BIG, prompt_ids=BIG_IDS),
}


def call(stack, rpc: str, request: object) -> tuple[grpc.StatusCode, str]:
    """Send one request; (status code, details)."""
    target = stack.engine if rpc == "engine" else stack.tokenizer
    with target.channel() as channel:
        if rpc == "engine":
            outcome = collect(engine_stub(channel).Generate(request, timeout=30))
            return outcome.code, outcome.details
        if rpc in ("generate", "raw_generate"):
            if rpc == "generate":
                responses = text_stub(channel).Generate(request, timeout=30)
            else:
                responses = channel.unary_stream(
                    "/llmserve.v1.TextGeneration/Generate", request_serializer=bytes,
                    response_deserializer=bytes)(request, timeout=30)
            outcome = collect(responses)
            return outcome.code, outcome.details
        method = getattr(text_stub(channel), rpc.capitalize())
        try:
            method(request, timeout=30)
        except grpc.RpcError as error:
            return error.code(), error.details() or ""
        return grpc.StatusCode.OK, ""


@pytest.fixture(scope="module")
def reference(stack) -> dict[str, list[int]]:
    """Greedy answers of both services before any bad input was sent."""
    with stack.tokenizer.channel() as channel:
        text = collect(text_stub(channel).Generate(text_request("Hello", 4), timeout=60))
    with stack.engine.channel() as channel:
        ids = collect(engine_stub(channel).Generate(engine_request(), timeout=60))
    assert text.code == ids.code == grpc.StatusCode.OK
    return {"tokenizer": text.token_ids, "engine": ids.token_ids}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_request_is_refused_and_the_next_one_is_served(stack, reference, name: str) -> None:
    case = CASES[name]
    code, details = call(stack, case.rpc, case.request())
    assert code == case.code, f"{name}: {code} {details!r}"
    for needle in case.needles:
        assert needle in details, f"{name}: {needle!r} not in {details!r}"
    # The same service answers a normal request exactly as before.
    service = "engine" if case.rpc == "engine" else "tokenizer"
    with getattr(stack, service).channel() as channel:
        if service == "engine":
            after = collect(engine_stub(channel).Generate(engine_request(), timeout=60))
        else:
            after = collect(text_stub(channel).Generate(text_request("Hello", 4), timeout=60))
    assert after.code == grpc.StatusCode.OK, after.details
    assert after.token_ids == reference[service]


def test_the_table_covers_both_services() -> None:
    assert len(CASES) >= 25
    assert sum(case.rpc == "engine" for case in CASES.values()) >= 10


def _start_long_stream(channel: grpc.Channel, rpc: str, request_id: str):
    if rpc == "engine":
        call_ = engine_stub(channel).Generate(
            engine_request(max_new_tokens=300, request_id=request_id, ignore_eos=True),
            timeout=60)
    else:
        call_ = text_stub(channel).Generate(
            text_request("Tell me a story.", 300, request_id=request_id, ignore_eos=True),
            timeout=60)
    next(call_)  # it is running now
    return call_


def test_duplicate_request_id_in_flight_is_already_exists_at_the_engine(stack) -> None:
    with stack.engine.channel() as channel:
        first = _start_long_stream(channel, "engine", "dup-engine")
        second = collect(engine_stub(channel).Generate(
            engine_request(request_id="dup-engine"), timeout=30))
        assert second.code == grpc.StatusCode.ALREADY_EXISTS, second.details
        assert "dup-engine" in second.details and "in flight" in second.details
        assert next(first).token_ids  # the first request is undisturbed
        first.cancel()
    assert not any(wait_pool_idle(stack.engine).values())


def test_clients_reusing_a_request_id_at_the_tokenizer_do_not_collide(stack) -> None:
    """The front gives every request its own engine id: a second client with the same
    request_id gets its own answer (the id echoed) and never learns of the first."""
    with stack.tokenizer.channel() as channel:
        alone = collect(text_stub(channel).Generate(text_request(request_id="solo"), timeout=30))
        first = _start_long_stream(channel, "text", "dup-tokenizer")
        second = collect(text_stub(channel).Generate(
            text_request(request_id="dup-tokenizer"), timeout=30))
        assert second.code == grpc.StatusCode.OK, second.details
        assert second.token_ids == alone.token_ids
        assert next(first).token_ids  # the first request is undisturbed
        first.cancel()
    assert not any(wait_pool_idle(stack.engine).values())


def test_top_k_beyond_vocab_means_off(stack) -> None:
    """uint32 top_k cannot be negative; any value >= vocab keeps every token, like 0."""
    with pytest.raises(ValueError):  # not even expressible: the client cannot serialize it
        generate_pb2.SamplingParams(top_k=-1)
    outputs = []
    with stack.tokenizer.channel() as channel:
        for top_k in (0, VOCAB, 2**32 - 1):
            request = text_request("Tell me a story.", 8,
                                   sampling={"temperature": 1.0, "seed": 1234, "top_k": top_k})
            outcome = collect(text_stub(channel).Generate(request, timeout=60))
            assert outcome.code == grpc.StatusCode.OK, outcome.details
            outputs.append(outcome.token_ids)
    assert outputs[0] == outputs[1] == outputs[2] and len(outputs[0]) == 8


def test_detokenize_invalid_utf8_gives_replacement_characters(stack) -> None:
    """A lone byte token that is not valid UTF-8 decodes to U+FFFD, the rest stays intact."""
    from tokenizer_svc.tokenizer import ModelTokenizer

    tokenizer = ModelTokenizer.from_pretrained(stack.model_dir)
    lone_bytes = [i for i in range(1000) if tokenizer.decode([i]) == "\ufffd"][:2]
    assert lone_bytes, "the vocabulary has no lone-byte token"
    hello = tokenizer.encode("Hello", add_special_tokens=False)
    with stack.tokenizer.channel() as channel:
        reply = text_stub(channel).Detokenize(
            generate_pb2.DetokenizeRequest(token_ids=hello + lone_bytes + hello), timeout=30)
    assert reply.text.startswith("Hello") and reply.text.endswith("Hello")
    assert "\ufffd" in reply.text


def test_no_crash_in_either_log_and_the_pool_is_idle(stack) -> None:
    state = wait_pool_idle(stack.engine)
    assert not any(state.values()), state
    for service in (stack.engine, stack.tokenizer):
        assert service.crash_lines() == [], service.name
