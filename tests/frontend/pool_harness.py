"""The tokenizer service in-process in front of several fake engines (tests of the engine pool,
routing and failover)."""
from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2

from llmserve.v1 import generate_pb2, generate_pb2_grpc
from tests.fakes.fake_engine import FakeEngine, FakeEngineServer, ScriptedReply
from tests.frontend.harness import (MAX_MODEL_LEN, free_port, model_dir, reply_ids,
                                    shared_tokenizer, wait_until)
from tokenizer_svc.app import FrontendServer
from tokenizer_svc.config import FrontendConfig

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def resuming(full: list[int] | None = None, **overrides) -> Callable[[object], ScriptedReply]:
    """A script streaming `full` (default: the reply text + eos) from where a resumed request
    left off (num_generated_prompt_tokens), like a real engine would continue."""
    ids = reply_ids() if full is None else full

    def script(request) -> ScriptedReply:
        return ScriptedReply(token_ids=ids[request.num_generated_prompt_tokens:], **overrides)
    return script


@dataclass
class PoolStack:
    """Fake engines + one tokenizer service + a client stub."""

    engines: list[FakeEngine]
    servers: list[FakeEngineServer]
    frontend: FrontendServer
    channel: grpc.aio.Channel
    stub: generate_pb2_grpc.TextGenerationStub

    @property
    def addresses(self) -> list[str]:
        return [server.address for server in self.servers]

    async def health(self) -> int | None:
        from grpc_health.v1 import health_pb2_grpc
        reply = await health_pb2_grpc.HealthStub(self.channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=2)
        return reply.status

    async def wait_health(self, status: int, timeout_s: float = 8.0) -> None:
        async def ok() -> bool:
            return await self.health() == status
        await wait_until(ok, timeout_s, f"front health never became {status}")

    async def wait_usable(self, index: int, usable: bool = True, timeout_s: float = 8.0) -> None:
        endpoint = lambda: self.frontend.engines.endpoints.get(self.addresses[index])  # noqa: E731
        await wait_until(lambda: (endpoint() is not None and endpoint().usable) == usable,
                         timeout_s, f"engine {index} never became usable={usable}")

    def sent(self, index: int) -> list:
        """Requests engine `index` received."""
        return self.engines[index].record.requests

    def metric(self, name: str, **labels: str) -> float:
        value = self.frontend.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    async def generate(self, request: generate_pb2.GenerateRequest, timeout: float = 20.0
                       ) -> list[generate_pb2.GenerateResponse]:
        return [m async for m in self.stub.Generate(request, timeout=timeout)]


@asynccontextmanager
async def pool_stack(scripts: list[Callable[[object], ScriptedReply]],
                     started: list[bool] | None = None, models: list[str] | None = None,
                     on_addresses: Callable[[list[str]], None] | None = None,
                     **config: object) -> AsyncIterator[PoolStack]:
    """One fake engine per script (started unless started[i] is False; models[i] names its
    model) and a FrontendServer with --engine listing them all (unless config says otherwise;
    on_addresses sees the engines' addresses before the front starts)."""
    tokenizer = shared_tokenizer()
    engines = [FakeEngine(script, max_model_len=MAX_MODEL_LEN, vocab_size=tokenizer.vocab_size,
                          eos_token_ids=tuple(tokenizer.eos_token_ids),
                          model=(models or [])[i] if models else "fake-model")
               for i, script in enumerate(scripts)]
    servers = [FakeEngineServer(engine) for engine in engines]
    for index, server in enumerate(servers):
        server.port = free_port()
        if started is None or started[index]:
            await server.start()
    if on_addresses is not None:
        on_addresses([server.address for server in servers])
    settings = dict(engine_address=",".join(s.address for s in servers), port=0, metrics_port=-1,
                    http_port=0, engine_poll_interval_s=0.05, engine_info_max_backoff_s=0.2)
    settings.update(config)
    if callable(settings["engine_address"]):   # built from the engines' addresses
        settings["engine_address"] = settings["engine_address"]([s.address for s in servers])
    frontend = FrontendServer(FrontendConfig(model_dir=model_dir(), **settings), tokenizer)
    try:
        await frontend.start()
    except BaseException:
        for server in servers:
            await server.stop()
        raise
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{frontend.port}")
    stack = PoolStack(engines, servers, frontend, channel,
                      generate_pb2_grpc.TextGenerationStub(channel))
    try:
        if started is None or any(started):
            await stack.wait_health(SERVING)
        yield stack
    finally:
        await channel.close()
        await frontend.stop(0)
        for server in servers:
            await server.stop()


def request(prompt: str = "Hello there", max_new_tokens: int = 64, **fields
            ) -> generate_pb2.GenerateRequest:
    """A greedy GenerateRequest."""
    message = generate_pb2.GenerateRequest(prompt=prompt, **fields)
    message.sampling.temperature = 0.0
    message.stopping.max_new_tokens = max_new_tokens
    return message


def text_of(messages) -> str:
    return "".join(m.text for m in messages)


def ids_of(messages) -> list[int]:
    return [t for m in messages for t in m.token_ids]
