"""Several real engines and tokenizer services on loopback (the scale-out tests and bench):
spawn them together, stream through a front with grpc.aio, and find prompts by route."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from llmserve.v1 import generate_pb2, generate_pb2_grpc
from tests.e2e.services import metric_value, scrape
from tests.reliability.harness import Proc, engine_proc, tokenizer_proc
from tokenizer_svc.router import prefix_key, rendezvous_rank
from tokenizer_svc.tokenizer import ModelTokenizer

# 4096 KV rows per engine: eight ~230-token system prompts stay cached beside running requests
ENGINE_EXTRA = ("--kv-capacity-tokens", "4096")


@dataclass
class Cluster:
    """Engines and the fronts in front of all of them."""

    engines: list[Proc]
    fronts: dict[str, Proc] = field(default_factory=dict)

    @property
    def engine_list(self) -> str:
        return ",".join(e.address for e in self.engines)

    def stop(self) -> None:
        for proc in [*self.fronts.values(), *self.engines]:
            proc.stop(timeout=10)


def start_cluster(model_dir: Path, log_dir: Path, engines: int,
                  fronts: dict[str, Sequence[str]]) -> Cluster:
    """`engines` engines (spawned together) and one front per name with its extra flags."""
    cluster = Cluster([engine_proc(model_dir, log_dir, *ENGINE_EXTRA).spawn()
                       for _ in range(engines)])
    try:
        for engine in cluster.engines:
            engine.wait_serving(timeout=180)
        for name, extra in fronts.items():
            cluster.fronts[name] = tokenizer_proc(model_dir, cluster.engine_list, log_dir,
                                                  *extra).spawn()
        for front in cluster.fronts.values():
            front.wait_serving(timeout=60)
    except BaseException:
        cluster.stop()
        raise
    return cluster


@dataclass
class Streamed:
    """What one Generate stream returned."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    usage: generate_pb2.Usage | None = None
    finish_reason: int = 0
    code: grpc.StatusCode = grpc.StatusCode.OK
    details: str = ""
    first_token_s: float | None = None
    messages: int = 0


async def stream(stub: generate_pb2_grpc.TextGenerationStub, request: generate_pb2.GenerateRequest,
                 timeout: float = 120.0, started: asyncio.Event | None = None,
                 after_messages: int = 2) -> Streamed:
    """Run one Generate; `started` is set once `after_messages` messages have arrived."""
    result, began = Streamed(), time.perf_counter()
    try:
        async for message in stub.Generate(request, timeout=timeout):
            if message.token_ids and result.first_token_s is None:
                result.first_token_s = time.perf_counter() - began
            result.messages += 1
            result.text += message.text
            result.token_ids.extend(message.token_ids)
            if message.HasField("usage"):
                result.usage = message.usage
            result.finish_reason = message.finish_reason or result.finish_reason
            if started is not None and result.messages == after_messages:
                started.set()
    except grpc.aio.AioRpcError as error:
        result.code, result.details = error.code(), error.details() or ""
    if started is not None:
        started.set()
    return result


def text_request(prompt: str | None = None, max_new_tokens: int = 32, *,
                 chat: Sequence[tuple[str, str]] = (), seed: int | None = None,
                 temperature: float = 0.0, ignore_eos: bool = True) -> generate_pb2.GenerateRequest:
    request = generate_pb2.GenerateRequest()
    if chat:
        for role, content in chat:
            request.chat.messages.add(role=role, content=content)
    else:
        request.prompt = prompt or ""
    request.sampling.temperature = temperature
    if seed is not None:
        request.sampling.seed = seed
        request.sampling.top_p = 0.95
    request.stopping.max_new_tokens = max_new_tokens
    request.stopping.ignore_eos = ignore_eos
    return request


def prompts_routed_to(tokenizer: ModelTokenizer, engines: Sequence[str], target: str,
                      count: int, template: str) -> list[str]:
    """`count` prompts (template.format(i)) whose prefix route's first choice is `target`."""
    found: list[str] = []
    for i in range(10_000):
        prompt = template.format(i)
        if rendezvous_rank(prefix_key(tokenizer.encode(prompt), 4), engines)[0] == target:
            found.append(prompt)
            if len(found) == count:
                return found
    raise AssertionError(f"no {count} prompts route to {target}")


def metric(proc: Proc, name: str) -> float:
    """A metric's value (summed over series) from a process's /metrics; 0 when absent."""
    try:
        return metric_value(scrape(proc.metrics_port), name)
    except KeyError:
        return 0.0


def engines_idle(engines: Sequence[Proc]) -> bool:
    """No engine runs or queues a request or holds KV rows for one."""
    for engine in engines:
        text = scrape(engine.metrics_port)
        if any(metric_value(text, f"llmserve_{name}") for name in
               ("requests_running", "requests_waiting", "kv_pool_used_tokens")):
            return False
    return True
