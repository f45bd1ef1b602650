"""Request validation: each bad field raises ValueError naming the field and its limit."""
from __future__ import annotations

import math

import pytest

from tokenizer_svc.schema import ChatTurn, SamplingSettings, TextRequest
from tokenizer_svc.validation import (resolve_max_new_tokens, validate_request,
                                      validate_token_ids)


def prompt_request(**overrides) -> TextRequest:
    sampling = overrides.pop("sampling", {})
    return TextRequest(request_id="r", prompt=overrides.pop("prompt", "hi"),
                       sampling=SamplingSettings(**sampling), **overrides)


BAD_REQUESTS = [
    (dict(prompt=""), "prompt must not be empty"),
    (dict(prompt=None), "input: set either prompt or chat"),
    (dict(sampling={"temperature": -0.1}), "sampling.temperature must be in [0, 100]"),
    (dict(sampling={"temperature": math.nan}), "sampling.temperature must be a finite"),
    (dict(sampling={"temperature": 101.0}), "sampling.temperature must be in [0, 100]"),
    (dict(sampling={"top_p": 0.0}), "sampling.top_p must be in (0, 1]"),
    (dict(sampling={"top_p": 1.5}), "sampling.top_p must be in (0, 1]"),
    (dict(sampling={"top_k": -1}), "sampling.top_k must be >= 0"),
    (dict(sampling={"min_p": 1.5}), "sampling.min_p must be in [0, 1]"),
    (dict(sampling={"repetition_penalty": 0.0}), "sampling.repetition_penalty must be in (0, 2]"),
    (dict(sampling={"repetition_penalty": 2.5}), "sampling.repetition_penalty must be in (0, 2]"),
    (dict(sampling={"presence_penalty": -3.0}), "sampling.presence_penalty must be in [-2, 2]"),
    (dict(sampling={"frequency_penalty": 2.5}), "sampling.frequency_penalty must be in [-2, 2]"),
    (dict(sampling={"seed": 2**63}), "sampling.seed must be in [0, 2^63)"),
    (dict(max_new_tokens=0), "stopping.max_new_tokens must be >= 1"),
    (dict(stop=["x"] * 17), "stopping.stop holds at most 16 strings, got 17"),
    (dict(stop=["ok", ""]), "stopping.stop[1] must not be empty"),
    (dict(stop=["y" * 257]), "stopping.stop[0] must be at most 256 characters, got 257"),
    (dict(stop_token_ids=list(range(65))), "stopping.stop_token_ids holds at most 64"),
    (dict(top_logprobs=21), "top_logprobs must be in [0, 20], got 21"),
]


@pytest.mark.parametrize("overrides,message", BAD_REQUESTS,
                         ids=[m.split(" ")[0] + str(i) for i, (_, m) in enumerate(BAD_REQUESTS)])
def test_bad_request_names_field_and_limit(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError) as error:
        validate_request(prompt_request(**overrides))
    assert message in str(error.value)


def test_chat_checks_roles_and_emptiness() -> None:
    with pytest.raises(ValueError, match=r"chat.messages must hold at least 1 message"):
        validate_request(TextRequest(request_id="r", chat=[]))
    with pytest.raises(ValueError, match=r"chat.messages\[1\].role must be one of system, user, "
                                         r"assistant, tool; got 'robot'"):
        validate_request(TextRequest(request_id="r", chat=[ChatTurn("user", "hi"),
                                                            ChatTurn("robot", "beep")]))
    validate_request(TextRequest(request_id="r", chat=[ChatTurn(role, "x") for role in
                                                       ("system", "user", "assistant", "tool")]))


def test_valid_edges_pass() -> None:
    validate_request(prompt_request(sampling=dict(temperature=0.0, top_p=1.0, min_p=1.0,
                                                  repetition_penalty=2.0, seed=0),
                                    stop=["s" * 256] * 16, top_logprobs=20, max_new_tokens=1))


def test_token_ids_must_be_below_vocab() -> None:
    validate_token_ids("token_ids", [0, 99], 100)
    with pytest.raises(ValueError, match=r"token_ids\[1\] must be in \[0, 100\), got 100"):
        validate_token_ids("token_ids", [5, 100], 100)


def test_max_new_tokens_against_context() -> None:
    assert resolve_max_new_tokens(None, 10, 100, 256) == 90  # default capped by the room
    assert resolve_max_new_tokens(None, 10, 1000, 256) == 256
    assert resolve_max_new_tokens(90, 10, 100, 256) == 90
    with pytest.raises(ValueError, match=r"max_new_tokens must be in \[1, 90\] \(max_model_len "
                                         r"100 - 10 prompt tokens\), got 91"):
        resolve_max_new_tokens(91, 10, 100, 256)
    with pytest.raises(ValueError, match=r"prompt is 100 tokens; it must be at most 99"):
        resolve_max_new_tokens(None, 100, 100, 256)
