"""An in-process fake of llmserve.v1.Engine for testing the tokenizer service over loopback.

It streams scripted token ids, honours cancellation and Abort, and records what happened.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from llmserve.v1 import engine_pb2, engine_pb2_grpc, generate_pb2
from tokenizer_svc.generation import merge_streams


@dataclass
class ScriptedReply:
    """What the fake engine streams for one request."""

    token_ids: list[int]
    finish_reason: int = generate_pb2.FINISH_REASON_EOS
    delay_s: float = 0.0           # pause before each message
    chunk_size: int = 1            # token ids per message
    cached_prompt_tokens: int = 0
    with_logprobs: bool = False
    error: grpc.StatusCode | None = None  # abort the call with this code instead
    error_message: str = ""


@dataclass
class FakeEngineRecord:
    """What the fake engine saw."""

    requests: list[engine_pb2.EngineGenerateRequest] = field(default_factory=list)
    abort_calls: list[str] = field(default_factory=list)
    aborted_samples: list[tuple[str, int | None]] = field(default_factory=list)  # (id, index)
    cancelled: list[str] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)
    compiled_formats: list[generate_pb2.ResponseFormat] = field(default_factory=list)
    engine_ids: list[str] = field(default_factory=list)  # request ids as sent (unique per call)


def public_id(engine_id: str) -> str:
    """The client's request_id inside an engine request id (tokenizer_svc adds '@' + a tag)."""
    return engine_id.rpartition("@")[0] if "@" in engine_id else engine_id


class FakeEngine(engine_pb2_grpc.EngineServicer):
    """Scripted Engine servicer: `script(request) -> ScriptedReply` (every sample of an n
    request streams it) or a list of n replies (one per sample)."""

    def __init__(self, script: Callable[[engine_pb2.EngineGenerateRequest],
                                        ScriptedReply | list[ScriptedReply]],
                 max_model_len: int = 512, vocab_size: int = 49152,
                 eos_token_ids: tuple[int, ...] = (2,), model: str = "fake-model") -> None:
        self.script = script
        self.model = model
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.record = FakeEngineRecord()
        self.format_error: str | None = None  # CompileResponseFormat fails with this message
        self._abort_events: dict[tuple[str, int], asyncio.Event] = {}   # (id, sample index)

    async def Generate(self, request, context):
        # the record and scripts see the client's id; engine_ids keeps what the front sent
        self.record.engine_ids.append(request.request_id)
        request.request_id = public_id(request.request_id)
        self.record.requests.append(request)
        samples = request.n or 1
        replies = self.script(request)   # one reply for every sample, or a list (one each)
        replies = replies if isinstance(replies, list) else [replies] * samples
        failed = next((reply for reply in replies if reply.error is not None), None)
        if failed is not None:
            await context.abort(failed.error, failed.error_message)
        aborted = [asyncio.Event() for _ in range(samples)]
        try:
            streams = [self._sample(request, i, replies[i], aborted[i]) for i in range(samples)]
            async for _, message in merge_streams(streams):
                yield message
            if not any(event.is_set() for event in aborted):
                self.record.completed.append(request.request_id)
        except asyncio.CancelledError:
            self.record.cancelled.append(request.request_id)
            raise

    async def _sample(self, request, index: int, reply: ScriptedReply, aborted: asyncio.Event):
        """The messages of sample `index` (each carries it); Abort sets `aborted`."""
        self._abort_events[(request.request_id, index)] = aborted
        ids = reply.token_ids[:request.max_new_tokens]
        finish = (reply.finish_reason if len(ids) == len(reply.token_ids)
                  else generate_pb2.FINISH_REASON_LENGTH)
        sent = 0
        try:
            while sent < len(ids):
                if await _wait_or_abort(aborted, reply.delay_s):
                    message = self._final([], generate_pb2.FINISH_REASON_ABORTED, request, sent,
                                          reply)
                    message.index = index
                    yield message
                    return
                chunk = ids[sent:sent + reply.chunk_size]
                sent += len(chunk)
                last = sent == len(ids)
                message = self._message(chunk, reply, request, sent, finish if last else None)
                message.index = index
                yield message
            if not ids:
                message = self._final([], finish, request, 0, reply)
                message.index = index
                yield message
        finally:
            self._abort_events.pop((request.request_id, index), None)

    def _message(self, chunk: list[int], reply: ScriptedReply, request, sent: int,
                 finish: int | None) -> engine_pb2.EngineGenerateResponse:
        if finish is not None:
            return self._final(chunk, finish, request, sent, reply)
        message = engine_pb2.EngineGenerateResponse(token_ids=chunk)
        if reply.with_logprobs:
            message.logprobs.extend(_logprobs(chunk, request.top_logprobs))
        return message

    def _final(self, chunk: list[int], finish: int, request, sent: int,
               reply: ScriptedReply) -> engine_pb2.EngineGenerateResponse:
        message = engine_pb2.EngineGenerateResponse(
            token_ids=chunk, finish_reason=finish,
            usage=generate_pb2.Usage(prompt_tokens=len(request.prompt_token_ids),
                                     completion_tokens=sent,
                                     cached_prompt_tokens=reply.cached_prompt_tokens))
        if reply.with_logprobs:
            message.logprobs.extend(_logprobs(chunk, request.top_logprobs))
        return message

    async def Abort(self, request, context):
        index = request.index if request.HasField("index") else None
        request.request_id = public_id(request.request_id)
        self.record.abort_calls.append(request.request_id)
        self.record.aborted_samples.append((request.request_id, index))
        events = [event for (request_id, i), event in self._abort_events.items()
                  if request_id == request.request_id and index in (None, i)]
        for event in events:
            event.set()
        return engine_pb2.AbortResponse(found=bool(events))

    async def CompileResponseFormat(self, request, context):
        self.record.compiled_formats.append(request.response_format)
        if self.format_error is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, self.format_error)
        return engine_pb2.CompileResponseFormatResponse()

    async def GetInfo(self, request, context):
        return engine_pb2.EngineInfo(
            model=self.model, dtype="float32", device="cpu", backend="torch",
            max_model_len=self.max_model_len, kv_pool_capacity_tokens=4096,
            vocab_size=self.vocab_size, eos_token_ids=self.eos_token_ids)


async def _wait_or_abort(aborted: asyncio.Event, delay_s: float) -> bool:
    """Sleep delay_s unless aborted first; True when aborted."""
    if aborted.is_set():
        return True
    if delay_s <= 0:
        await asyncio.sleep(0)
        return aborted.is_set()
    try:
        await asyncio.wait_for(aborted.wait(), delay_s)
    except TimeoutError:
        return False
    return True


def _logprobs(chunk: list[int], top: int) -> list[generate_pb2.TokenLogprob]:
    return [generate_pb2.TokenLogprob(
        token_id=token_id, logprob=-0.5,
        top=[generate_pb2.TopLogprob(token_id=token_id + k, logprob=-0.5 - k) for k in range(top)])
        for token_id in chunk]


class FakeEngineServer:
    """Runs a FakeEngine (+ grpc.health.v1 SERVING) on 127.0.0.1; restartable on the same port."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self.health: health.aio.HealthServicer | None = None   # set_serving() flips it

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self, port: int | None = None) -> int:
        server = grpc.aio.server()
        engine_pb2_grpc.add_EngineServicer_to_server(self.engine, server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        self.port = server.add_insecure_port(f"127.0.0.1:{self.port if port is None else port}")
        await server.start()
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        self._server, self.health = server, health_servicer
        return self.port

    async def set_serving(self, serving: bool) -> None:
        assert self.health is not None
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING if serving
                              else health_pb2.HealthCheckResponse.NOT_SERVING)

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)
            self._server = None
