"""Runs the tokenizer service in-process against the fake engine, both on loopback."""
from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.common import free_port  # noqa: F401  (tests import it from here)
from llmserve.v1 import generate_pb2, generate_pb2_grpc
from tests.fakes.fake_engine import FakeEngine, FakeEngineServer, ScriptedReply
from tests.fakes.tiny_tokenizer import service_tokenizer_dir
from tokenizer_svc.app import FrontendServer
from tokenizer_svc.config import FrontendConfig
from tokenizer_svc.tokenizer import ModelTokenizer

REPLY_TEXT = "The answer is 42. Done here, and a few more words 😀 你好."
MAX_MODEL_LEN = 512
_TMP = tempfile.TemporaryDirectory(prefix="llmserve-frontend-tests-")
_TOKENIZER: ModelTokenizer | None = None


def model_dir() -> Path:
    return service_tokenizer_dir(Path(_TMP.name))


def shared_tokenizer() -> ModelTokenizer:
    """The service's tokenizer (real SmolLM2 when converted, else the tiny one), loaded once."""
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = ModelTokenizer.from_pretrained(model_dir())
    return _TOKENIZER


def reply_ids(text: str = REPLY_TEXT, eos: bool = True) -> list[int]:
    tokenizer = shared_tokenizer()
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids + tokenizer.eos_token_ids[:1] if eos else ids


def text_reply(**overrides) -> Callable[[object], ScriptedReply]:
    """A script answering every request with REPLY_TEXT (+ eos), one token per message."""
    def script(request) -> ScriptedReply:
        return ScriptedReply(token_ids=reply_ids(), **overrides)
    return script


@dataclass
class Stack:
    """A running fake engine + tokenizer service + a client stub."""

    engine: FakeEngine
    engine_server: FakeEngineServer
    frontend: FrontendServer
    channel: grpc.aio.Channel
    stub: generate_pb2_grpc.TextGenerationStub

    async def health_status(self, service: str = "") -> int:
        stub = health_pb2_grpc.HealthStub(self.channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
        return reply.status

    async def wait_health(self, status: int, service: str = "", timeout_s: float = 8.0) -> None:
        await wait_until(lambda: self._health_is(status, service), timeout_s,
                         f"health of {service!r} never became {status}")

    async def _health_is(self, status: int, service: str) -> bool:
        return await self.health_status(service) == status

    @property
    def http_url(self) -> str:
        """Base URL of the OpenAI HTTP API (start the stack with http_port=free_port())."""
        assert self.frontend.http_port, "this stack was started without the HTTP API"
        return f"http://127.0.0.1:{self.frontend.http_port}"

    async def generate(self, request: generate_pb2.GenerateRequest, timeout: float = 10.0
                       ) -> list[generate_pb2.GenerateResponse]:
        return [message async for message in self.stub.Generate(request, timeout=timeout)]


async def wait_until(predicate: Callable[[], Awaitable[bool] | bool], timeout_s: float,
                     message: str) -> None:
    """Poll predicate every 20 ms until true; AssertionError with message after timeout_s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(message)


@asynccontextmanager
async def running_stack(script: Callable[[object], ScriptedReply] | None = None,
                        start_engine: bool = True,
                        credentials: grpc.ChannelCredentials | None = None,
                        **config: object) -> AsyncIterator[Stack]:
    """Fake engine (started unless start_engine=False) + FrontendServer on free ports (the HTTP
    API only when asked for with http_port=free_port()); `credentials` for a TLS gRPC port."""
    tokenizer = shared_tokenizer()
    engine = FakeEngine(script or text_reply(), max_model_len=MAX_MODEL_LEN,
                        vocab_size=tokenizer.vocab_size, eos_token_ids=tuple(tokenizer.eos_token_ids))
    engine_server = FakeEngineServer(engine)
    engine_server.port = free_port()
    if start_engine:
        await engine_server.start()
    settings = dict(engine_address=engine_server.address, port=0, metrics_port=0,
                    http_port=0, engine_poll_interval_s=0.1, engine_info_max_backoff_s=0.2)
    settings.update(config)
    frontend = FrontendServer(FrontendConfig(model_dir=model_dir(), **settings), tokenizer)
    await frontend.start()
    address = f"127.0.0.1:{frontend.port}"
    channel = (grpc.aio.insecure_channel(address) if credentials is None
               else grpc.aio.secure_channel(address, credentials))
    stack = Stack(engine, engine_server, frontend, channel,
                  generate_pb2_grpc.TextGenerationStub(channel))
    try:
        if start_engine:
            await stack.wait_health(health_pb2.HealthCheckResponse.SERVING)
        yield stack
    finally:
        await channel.close()
        await frontend.stop(0)
        await engine_server.stop()
