"""The public gRPC edge: llmserve.v1.TextGeneration, protobuf <-> internal dataclasses.

Everything behind this file (validation, tokenizer, generation, stops, detokenizer) works on
the dataclasses of schema.py; the engine edge is engine_client.py.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from llmserve.v1 import generate_pb2, generate_pb2_grpc
from tokenizer_svc.config import FrontendConfig
from tokenizer_svc.decode_guard import DecodeGuardInterceptor
from tokenizer_svc.generation import GenerationStream, TokenSource
from tokenizer_svc.metrics import FrontendMetrics
from tokenizer_svc.schema import (ChatTurn, EngineLimits, EngineRequest, FinishReason,
                                  OutputDelta, SamplingSettings, ServiceError, TextRequest)
from tokenizer_svc.tokenizer import ModelTokenizer
from tokenizer_svc.validation import (resolve_max_new_tokens, validate_request,
                                      validate_request_id, validate_token_ids)

THREAD_TOKENIZE_CHARS = 8192  # longer prompts are tokenized in a worker thread
# The client's deadline fires first (ours starts when its request arrives, a transit later), and
# its cancel reaches us slightly before our own deadline: count such a cancel as a deadline.
DEADLINE_SLACK_S = 0.1
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
        ignore_eos=stopping.ignore_eos, top_logprobs=message.top_logprobs)


def delta_to_proto(delta: OutputDelta, request_id: str) -> generate_pb2.GenerateResponse:
    """OutputDelta -> GenerateResponse (finish_reason and usage only on the last one)."""
    message = generate_pb2.GenerateResponse(
        request_id=request_id, text=delta.text, token_ids=delta.token_ids,
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


class EngineState:
    """What is known about the engine right now (kept up to date by app.EngineMonitor)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.limits: EngineLimits | None = None

    def require_limits(self) -> EngineLimits:
        if self.limits is None:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE,
                               f"engine at {self.address} unavailable: model info not loaded "
                               f"yet (GetInfo has not succeeded)")
        return self.limits


class TextGenerationServicer(generate_pb2_grpc.TextGenerationServicer):
    """Implements llmserve.v1.TextGeneration on top of the tokenizer and an engine."""

    def __init__(self, config: FrontendConfig, tokenizer: ModelTokenizer, source: TokenSource,
                 engine: EngineState, metrics: FrontendMetrics) -> None:
        self._config = config
        self._tokenizer = tokenizer
        self._source = source
        self._engine = engine
        self._metrics = metrics
        self._inflight: set[str] = set()

    async def Generate(self, request: generate_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[generate_pb2.GenerateResponse]:
        started = time.perf_counter()
        request_id = request.request_id or uuid.uuid4().hex
        code, detail = self._admission_error(request_id)
        if code is not None:
            self._metrics.requests_total.labels(code.name.lower()).inc()
            await context.abort(code, detail)
        self._inflight.add(request_id)
        self._metrics.inflight_requests.inc()
        code = grpc.StatusCode.OK
        try:
            async for message in self._generate(request, request_id, context, started):
                yield message
        except ValueError as error:
            code, detail = grpc.StatusCode.INVALID_ARGUMENT, str(error)
        except ServiceError as error:
            code, detail = error.code, error.message
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            code = (grpc.StatusCode.DEADLINE_EXCEEDED
                    if remaining is not None and remaining <= DEADLINE_SLACK_S
                    else grpc.StatusCode.CANCELLED)
            raise
        finally:
            self._inflight.discard(request_id)
            self._metrics.inflight_requests.dec()
            self._metrics.requests_total.labels(code.name.lower()).inc()
            self._metrics.request_latency_seconds.observe(time.perf_counter() - started)
        if code != grpc.StatusCode.OK:
            await context.abort(code, detail)

    def _admission_error(self, request_id: str) -> tuple[grpc.StatusCode | None, str]:
        try:
            validate_request_id(request_id)
        except ValueError as error:
            return grpc.StatusCode.INVALID_ARGUMENT, str(error)
        if request_id in self._inflight:
            return grpc.StatusCode.ALREADY_EXISTS, f"request_id {request_id!r} is already in flight"
        if len(self._inflight) >= self._config.max_concurrent:
            return (grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"too many concurrent requests: limit is {self._config.max_concurrent} "
                    f"(--max-concurrent)")
        return None, ""

    async def _generate(self, request: generate_pb2.GenerateRequest, request_id: str,
                        context: grpc.aio.ServicerContext, started: float
                        ) -> AsyncIterator[generate_pb2.GenerateResponse]:
        text_request = request_from_proto(request, request_id)
        engine_request = await self._prepare(text_request)
        stream = GenerationStream(engine_request, text_request.stop,
                                  self._tokenizer.decode_stream_piece, self._source,
                                  self._config.abort_drain_timeout_s)
        first_token_seen = False
        async for delta in stream.run(context.time_remaining()):
            if delta.token_ids and not first_token_seen:
                first_token_seen = True
                self._metrics.time_to_first_token_seconds.observe(time.perf_counter() - started)
            yield delta_to_proto(delta, request_id)

    def _prompt_ids(self, request: TextRequest) -> list[int]:
        started = time.perf_counter()
        if request.chat is not None:
            prompt_ids = self._tokenizer.chat_ids(request.chat)
        else:
            assert request.prompt is not None
            prompt_ids = self._tokenizer.encode(request.prompt)
        self._metrics.tokenize_seconds.observe(time.perf_counter() - started)
        return prompt_ids

    async def _prepare(self, request: TextRequest) -> EngineRequest:
        """Validate, tokenize and size the request; ValueError/ServiceError on bad input."""
        validate_request(request)
        limits = self._engine.require_limits()
        validate_token_ids("stopping.stop_token_ids", request.stop_token_ids, limits.vocab_size)
        chars = (len(request.prompt) if request.prompt is not None
                 else sum(len(turn.content) for turn in request.chat or []))
        if chars > THREAD_TOKENIZE_CHARS:  # long input: keep the event loop responsive
            prompt_ids = await asyncio.to_thread(self._prompt_ids, request)
        else:
            prompt_ids = self._prompt_ids(request)
        if not prompt_ids:
            raise ValueError("prompt tokenizes to 0 tokens; it must hold at least 1 token")
        max_new_tokens = resolve_max_new_tokens(request.max_new_tokens, len(prompt_ids),
                                                limits.max_model_len,
                                                self._config.default_max_new_tokens)
        return EngineRequest(
            request_id=request.request_id, prompt_token_ids=prompt_ids,
            sampling=request.sampling, max_new_tokens=max_new_tokens,
            stop_token_ids=request.stop_token_ids, ignore_eos=request.ignore_eos,
            top_logprobs=request.top_logprobs)

    async def Tokenize(self, request: generate_pb2.TokenizeRequest,
                       context: grpc.aio.ServicerContext) -> generate_pb2.TokenizeResponse:
        add_special = (request.add_special_tokens if request.HasField("add_special_tokens")
                       else None)
        started = time.perf_counter()
        if len(request.text) > THREAD_TOKENIZE_CHARS:  # keep the event loop responsive
            token_ids = await asyncio.to_thread(self._tokenizer.encode, request.text,
                                                add_special_tokens=add_special)
        else:
            token_ids = self._tokenizer.encode(request.text, add_special_tokens=add_special)
        self._metrics.tokenize_seconds.observe(time.perf_counter() - started)
        return generate_pb2.TokenizeResponse(token_ids=token_ids)

    async def Detokenize(self, request: generate_pb2.DetokenizeRequest,
                         context: grpc.aio.ServicerContext) -> generate_pb2.DetokenizeResponse:
        token_ids = list(request.token_ids)
        try:
            validate_token_ids("token_ids", token_ids, self._tokenizer.vocab_size)
        except ValueError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        # Ids whose bytes are not valid UTF-8 (e.g. a lone byte token) decode to U+FFFD.
        if len(token_ids) > THREAD_TOKENIZE_CHARS:
            text = await asyncio.to_thread(self._tokenizer.decode, token_ids,
                                           skip_special_tokens=request.skip_special_tokens)
        else:
            text = self._tokenizer.decode(token_ids,
                                          skip_special_tokens=request.skip_special_tokens)
        return generate_pb2.DetokenizeResponse(text=text)

    async def GetModelInfo(self, request: generate_pb2.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> generate_pb2.ModelInfo:
        try:
            limits = self._engine.require_limits()
        except ServiceError as error:
            await context.abort(error.code, error.message)
        return generate_pb2.ModelInfo(
            model=limits.model or self._tokenizer.name, max_context=limits.max_model_len,
            vocab_size=limits.vocab_size,
            eos_token_ids=limits.eos_token_ids or self._tokenizer.eos_token_ids,
            has_chat_template=self._tokenizer.has_chat_template)


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
