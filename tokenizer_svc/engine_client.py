"""The engine edge: gRPC calls to llmserve.v1.Engine, converted to/from internal dataclasses.

The channel is created once and never replaced: gRPC reconnects by itself (backoff capped
at 1 s here) when the engine comes back, and no call result is cached across failures.
"""
from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmserve.v1 import engine_pb2, engine_pb2_grpc, generate_pb2
from tokenizer_svc.schema import (EngineChunk, EngineLimits, EngineRequest, FinishReason,
                                  ResponseFormatSpec, ServiceError, TokenLogprobInfo,
                                  UsageCounts)

CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]
PASSED_THROUGH = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                  grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.DEADLINE_EXCEEDED,
                  grpc.StatusCode.CANCELLED, grpc.StatusCode.FAILED_PRECONDITION}
_FINISH_FROM_PROTO = {
    generate_pb2.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    generate_pb2.FINISH_REASON_EOS: FinishReason.EOS,
    generate_pb2.FINISH_REASON_STOP_SEQUENCE: FinishReason.STOP_SEQUENCE,
    generate_pb2.FINISH_REASON_STOP_TOKEN: FinishReason.STOP_TOKEN,
    generate_pb2.FINISH_REASON_ABORTED: FinishReason.ABORTED,
}


def _sampling_to_proto(request: EngineRequest) -> generate_pb2.SamplingParams:
    s = request.sampling
    message = generate_pb2.SamplingParams(
        temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, min_p=s.min_p,
        repetition_penalty=s.repetition_penalty, presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty)
    if s.seed is not None:
        message.seed = s.seed
    return message


def request_to_proto(request: EngineRequest) -> engine_pb2.EngineGenerateRequest:
    """Internal EngineRequest -> protobuf."""
    return engine_pb2.EngineGenerateRequest(
        request_id=request.request_id, prompt_token_ids=request.prompt_token_ids,
        sampling=_sampling_to_proto(request), max_new_tokens=request.max_new_tokens,
        stop_token_ids=request.stop_token_ids, ignore_eos=request.ignore_eos,
        top_logprobs=request.top_logprobs, logit_bias=request.logit_bias,
        min_tokens=request.min_tokens, n=request.n,
        num_generated_prompt_tokens=request.num_generated_prompt_tokens,
        response_format=response_format_to_proto(request.response_format))


def response_format_to_proto(spec: ResponseFormatSpec | None) -> generate_pb2.ResponseFormat:
    """Internal ResponseFormatSpec -> protobuf (None -> an unset ResponseFormat)."""
    if spec is None:
        return generate_pb2.ResponseFormat()
    if spec.kind == "choice":
        return generate_pb2.ResponseFormat(choice=generate_pb2.Choices(values=list(spec.value)))
    return generate_pb2.ResponseFormat(**{spec.kind: spec.value})


def chunk_from_proto(message: engine_pb2.EngineGenerateResponse) -> EngineChunk:
    """Protobuf stream message -> internal EngineChunk."""
    logprobs = [TokenLogprobInfo(lp.token_id, lp.logprob, [(t.token_id, t.logprob) for t in lp.top])
                for lp in message.logprobs]
    usage = None
    if message.HasField("usage"):
        u = message.usage
        usage = UsageCounts(u.prompt_tokens, u.completion_tokens, u.cached_prompt_tokens)
    return EngineChunk(token_ids=list(message.token_ids), logprobs=logprobs,
                       finish_reason=_FINISH_FROM_PROTO.get(message.finish_reason), usage=usage,
                       index=message.index)


class EngineClient:
    """Async client of one engine: info, health, streaming generate, abort."""

    def __init__(self, address: str, credentials: grpc.ChannelCredentials | None = None,
                 server_name: str | None = None) -> None:
        """credentials: TLS to the engine (None: plaintext); server_name overrides the name
        checked in the engine's certificate."""
        self.address = address
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        else:
            options = list(CHANNEL_OPTIONS)
            if server_name:
                options.append(("grpc.ssl_target_name_override", server_name))
            self._channel = grpc.aio.secure_channel(address, credentials, options=options)
        self._stub = engine_pb2_grpc.EngineStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _error(self, error: grpc.aio.AioRpcError) -> ServiceError:
        code = error.code()
        if code in PASSED_THROUGH:
            return ServiceError(code, f"engine: {error.details()}")
        if code == grpc.StatusCode.UNAVAILABLE:
            return ServiceError(code, f"engine at {self.address} unavailable: {error.details()}")
        return ServiceError(code, f"engine at {self.address} failed: {code.name}: "
                                  f"{error.details()}")

    async def fetch_info(self, timeout_s: float = 2.0) -> EngineLimits:
        """One GetInfo call; ServiceError when the engine cannot answer."""
        try:
            info = await self._stub.GetInfo(engine_pb2.GetInfoRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError as error:
            raise self._error(error) from None
        return EngineLimits(model=info.model, max_model_len=info.max_model_len,
                            vocab_size=info.vocab_size, eos_token_ids=list(info.eos_token_ids),
                            kv_pool_capacity_tokens=info.kv_pool_capacity_tokens,
                            backend=info.backend, device=info.device, dtype=info.dtype)

    async def watch_health(self) -> AsyncIterator[bool]:
        """grpc.health.v1 Watch of the whole server: True (SERVING) or False on every change;
        grpc.aio.AioRpcError when the engine is unreachable or the stream breaks."""
        call = self._health.Watch(health_pb2.HealthCheckRequest(service=""))
        try:
            async for reply in call:
                yield reply.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            if not call.done():
                call.cancel()

    def open_stream(self, request: EngineRequest,
                    timeout_s: float | None = None) -> EngineStream:
        """Start a Generate call; iterate the returned stream for its chunks."""
        return EngineStream(self, self._stub.Generate(request_to_proto(request),
                                                      timeout=timeout_s))

    async def generate(self, request: EngineRequest,
                       timeout_s: float | None = None) -> AsyncIterator[EngineChunk]:
        """Stream the engine's chunks; closing this generator early cancels the engine call."""
        stream = self.open_stream(request, timeout_s)
        try:
            async for chunk in stream:
                yield chunk
        finally:
            stream.cancel()

    async def check_response_format(self, spec: ResponseFormatSpec,
                                    timeout_s: float = 30.0) -> None:
        """Have the engine compile (and cache) a response_format: ValueError with the engine's
        message (it names the field) when it does not compile, ServiceError when the engine
        cannot answer."""
        request = engine_pb2.CompileResponseFormatRequest(
            response_format=response_format_to_proto(spec))
        try:
            await self._stub.CompileResponseFormat(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise ValueError(error.details()) from None
            raise self._error(error) from None

    async def abort(self, request_id: str, timeout_s: float = 1.0,
                    index: int | None = None) -> bool:
        """Ask the engine to abort a request (index: only that sample of an n-sample request);
        False when it was unknown or the call failed."""
        try:
            reply = await self._stub.Abort(engine_pb2.AbortRequest(request_id=request_id,
                                                                   index=index),
                                           timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return False
        return reply.found

    async def close(self) -> None:
        await self._channel.close()


class EngineStream:
    """One open Generate call: its chunks, and cancel() from any task of the loop (a reader
    then gets asyncio.CancelledError)."""

    def __init__(self, client: EngineClient, call: grpc.aio.UnaryStreamCall) -> None:
        self._client = client
        self._call = call

    async def __aiter__(self) -> AsyncIterator[EngineChunk]:
        try:
            async for message in self._call:
                yield chunk_from_proto(message)
        except grpc.aio.AioRpcError as error:
            raise self._client._error(error) from None  # noqa: SLF001

    def cancel(self) -> None:
        """End the call (the engine aborts the request and frees its KV)."""
        if not self._call.done():
            self._call.cancel()
