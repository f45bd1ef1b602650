"""The public gRPC edge: llmserve.v1.TextGeneration, protobuf <-> internal dataclasses.

Everything behind this file (frontend.FrontendCore: admission, validation, tokenizer,
generation, stops, detokenizer) works on the dataclasses of schema.py and is shared with the
OpenAI HTTP edge (http_api.py); the engine edge is engine_client.py.
"""
from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from llmserve.v1 import generate_pb2, generate_pb2_grpc
from tokenizer_svc.decode_guard import DecodeGuardInterceptor
from tokenizer_svc.frontend import FrontendCore
from tokenizer_svc.schema import (ChatTurn, FinishReason, OutputDelta, ResponseFormatSpec,
                                  SamplingSettings, ServiceError, TextRequest)
SERVICE_NAME = generate_pb2.DESCRIPTOR.services_by_name["TextGeneration"].full_name
_FINISH_TO_PROTO = {
    FinishReason.LENGTH: generate_pb2.FINISH_REASON_LENGTH,
    FinishReason.EOS: generate_pb2.FINISH_REASON_EOS,
    FinishReason.STOP_SEQUENCE: generate_pb2.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.STOP_TOKEN: generate_pb2.FINISH_REASON_STOP_TOKEN,
    FinishReason.ABORTED: generate_pb2.FINISH_REASON_ABORTED,
}


def _optional(message: object, name: str, default: float) -> float:
    return getattr(message, name) if message.HasField(name) else default  # type: ignore[attr-defined]


def request_from_proto(message: generate_pb2.GenerateRequest, request_id: str) -> TextRequest:
    """GenerateRequest -> TextRequest, applying the defaults of unset optional fields."""
    s = message.sampling
    sampling = SamplingSettings(
        temperature=_optional(s, "temperature", 1.0), top_p=_optional(s, "top_p", 1.0),
        top_k=s.top_k, min_p=s.min_p,
        repetition_penalty=_optional(s, "repetition_penalty", 1.0),
        presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
        seed=s.seed if s.HasField("seed") else None)
    kind = message.WhichOneof("input")
    stopping = message.stopping
    return TextRequest(
        request_id=request_id,
        prompt=message.prompt if kind == "prompt" else None,
        chat=[ChatTurn(m.role, m.content) for m in message.chat.messages] if kind == "chat"
        else None,
        sampling=sampling,
        max_new_tokens=(stopping.max_new_tokens if stopping.HasField("max_new_tokens")
                        else None),
        stop=list(stopping.stop), stop_token_ids=list(stopping.stop_token_ids),
        ignore_eos=stopping.ignore_eos, top_logprobs=message.top_logprobs,
        n=message.n or 1, logit_bias=dict(message.logit_bias), min_tokens=stopping.min_tokens,
        response_format=_response_format(message))


def _response_format(message: generate_pb2.GenerateRequest) -> ResponseFormatSpec | None:
    kind = message.response_format.WhichOneof("kind")
    if kind is None:
        return None
    value = getattr(message.response_format, kind)
    return ResponseFormatSpec(kind, list(value.values) if kind == "choice" else value)


def delta_to_proto(delta: OutputDelta, request_id: str) -> generate_pb2.GenerateResponse:
    """OutputDelta -> GenerateResponse (finish_reason and usage only on the last one)."""
    message = generate_pb2.GenerateResponse(
        request_id=request_id, text=delta.text, token_ids=delta.token_ids, index=delta.index,
        logprobs=[generate_pb2.TokenLogprob(
            token_id=lp.token_id, logprob=lp.logprob,
            top=[generate_pb2.TopLogprob(token_id=t, logprob=p) for t, p in lp.top])
            for lp in delta.logprobs])
    if delta.finish_reason is not None:
        message.finish_reason = _FINISH_TO_PROTO[delta.finish_reason]
    if delta.usage is not None:
        message.usage.prompt_tokens = delta.usage.prompt_tokens
        message.usage.completion_tokens = delta.usage.completion_tokens
        message.usage.cached_prompt_tokens = delta.usage.cached_prompt_tokens
    return message


class TextGenerationServicer(generate_pb2_grpc.TextGenerationServicer):
    """Implements llmserve.v1.TextGeneration: protobuf in and out, FrontendCore in between."""

    def __init__(self, core: FrontendCore) -> None:
        self._core = core

    async def Generate(self, request: generate_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[generate_pb2.GenerateResponse]:
        request_id = request.request_id or uuid.uuid4().hex
        deltas = self._core.generate(request_from_proto(request, request_id), "grpc",
                                     context.time_remaining())
        try:
            async for delta in deltas:
                yield delta_to_proto(delta, request_id)
        except ServiceError as error:
            await context.abort(error.code, error.message)

    async def Tokenize(self, request: generate_pb2.TokenizeRequest,
                       context: grpc.aio.ServicerContext) -> generate_pb2.TokenizeResponse:
        add_special = (request.add_special_tokens if request.HasField("add_special_tokens")
                       else None)
        token_ids = await self._core.tokenize(request.text, add_special, "grpc")
        return generate_pb2.TokenizeResponse(token_ids=token_ids)

    async def Detokenize(self, request: generate_pb2.DetokenizeRequest,
                         context: grpc.aio.ServicerContext) -> generate_pb2.DetokenizeResponse:
        try:
            text = await self._core.detokenize(list(request.token_ids),
                                               request.skip_special_tokens)
        except ValueError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return generate_pb2.DetokenizeResponse(text=text)

    async def GetModelInfo(self, request: generate_pb2.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> generate_pb2.ModelInfo:
        try:
            limits = self._core.limits()
        except ServiceError as error:
            await context.abort(error.code, error.message)
        return generate_pb2.ModelInfo(
            model=self._core.model_name, max_context=limits.max_model_len,
            vocab_size=limits.vocab_size, eos_token_ids=self._core.eos_token_ids,
            has_chat_template=self._core.tokenizer.has_chat_template)


def build_grpc_server(servicer: TextGenerationServicer,
                      health_servicer: health.aio.HealthServicer,
                      max_message_bytes: int = 4 * 1024 * 1024,
                      interceptors: Sequence[grpc.aio.ServerInterceptor] = ()
                      ) -> grpc.aio.Server:
    """A grpc.aio server with TextGeneration, grpc.health.v1 and reflection (not started).

    Larger messages than max_message_bytes fail with RESOURCE_EXHAUSTED, unparsable ones with
    INVALID_ARGUMENT (`interceptors` run first, e.g. the API key check); SO_REUSEPORT is off,
    so a second process cannot bind the same port and silently take half of the connections.
    """
    server = grpc.aio.server(
        interceptors=[*interceptors, DecodeGuardInterceptor()],
        options=[("grpc.max_receive_message_length", max_message_bytes),
                 ("grpc.max_send_message_length", max_message_bytes),
                 ("grpc.so_reuseport", 0)])
    generate_pb2_grpc.add_TextGenerationServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    return server


async def publish_health(health_servicer: health.aio.HealthServicer, serving: bool) -> None:
    """Set SERVING / NOT_SERVING for the whole server ("") and for TextGeneration."""
    status = (health_pb2.HealthCheckResponse.SERVING if serving
              else health_pb2.HealthCheckResponse.NOT_SERVING)
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, status)
