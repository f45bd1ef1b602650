"""Request builders and stream collectors for the public and the engine API."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import grpc

from llmserve.v1 import engine_pb2, engine_pb2_grpc, generate_pb2, generate_pb2_grpc

PROMPTS = ("The capital of France is", "Write a list of three fruits:", "def add(a, b):",
           "The quick brown fox", "Once upon a time", "1, 2, 3, 4,", "Water boils at",
           "My favourite colour is")


def text_request(prompt: str | None = "Hello", max_new_tokens: int | None = 4, *,
                 chat: Iterable[tuple[str, str]] | None = None, request_id: str = "",
                 top_logprobs: int = 0, sampling: dict | None = None,
                 **stopping) -> generate_pb2.GenerateRequest:
    """A GenerateRequest: greedy unless `sampling` says otherwise."""
    request = generate_pb2.GenerateRequest(
        request_id=request_id, top_logprobs=top_logprobs,
        sampling=generate_pb2.SamplingParams(**({"temperature": 0.0} | (sampling or {}))),
        stopping=generate_pb2.StoppingCriteria(**stopping))
    if max_new_tokens is not None:
        request.stopping.max_new_tokens = max_new_tokens
    if chat is not None:
        request.chat.SetInParent()
        for role, content in chat:
            request.chat.messages.add(role=role, content=content)
    elif prompt is not None:
        request.prompt = prompt
    return request


def engine_request(prompt_ids: Iterable[int] = (1, 2, 3, 4), max_new_tokens: int = 4, *,
                   request_id: str = "", top_logprobs: int = 0, sampling: dict | None = None,
                   **fields) -> engine_pb2.EngineGenerateRequest:
    """An EngineGenerateRequest (greedy unless `sampling` says otherwise)."""
    return engine_pb2.EngineGenerateRequest(
        request_id=request_id, prompt_token_ids=list(prompt_ids), max_new_tokens=max_new_tokens,
        top_logprobs=top_logprobs,
        sampling=generate_pb2.SamplingParams(**({"temperature": 0.0} | (sampling or {}))),
        **fields)


def text_stub(channel: grpc.Channel) -> generate_pb2_grpc.TextGenerationStub:
    return generate_pb2_grpc.TextGenerationStub(channel)


def engine_stub(channel: grpc.Channel) -> engine_pb2_grpc.EngineStub:
    return engine_pb2_grpc.EngineStub(channel)


@dataclass
class Outcome:
    """What one streaming call produced: its text and ids, finish reason, or its error."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: int = 0
    code: grpc.StatusCode = grpc.StatusCode.OK
    details: str = ""
    messages: int = 0


def collect(responses) -> Outcome:
    """Drain a (sync) response stream; errors become the outcome's code and details."""
    outcome = Outcome()
    try:
        for message in responses:
            outcome.messages += 1
            outcome.text += getattr(message, "text", "")
            outcome.token_ids.extend(message.token_ids)
            outcome.finish_reason = message.finish_reason or outcome.finish_reason
    except grpc.RpcError as error:
        outcome.code, outcome.details = error.code(), error.details() or ""
    return outcome


async def collect_async(call, outcome: Outcome | None = None) -> Outcome:
    """Drain a grpc.aio response stream with `read()` (so it may follow earlier reads);
    errors become the outcome's code and details."""
    outcome = outcome or Outcome()
    try:
        while (message := await call.read()) is not grpc.aio.EOF:
            outcome.messages += 1
            outcome.text += getattr(message, "text", "")
            outcome.token_ids.extend(message.token_ids)
            outcome.finish_reason = message.finish_reason or outcome.finish_reason
    except grpc.aio.AioRpcError as error:
        outcome.code, outcome.details = error.code(), error.details() or ""
    return outcome
