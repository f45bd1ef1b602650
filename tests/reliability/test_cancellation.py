"""Cancellation storm: 500 streams cancelled at random moments (before admission, during
prefill, during decode), 50 at a time. Afterwards no KV row is leaked, no request is left in
either service, neither log shows a crash, and health stayed SERVING all along.
"""
from __future__ import annotations

import asyncio
import random
from collections import Counter

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.e2e.services import metric_value, scrape
from tests.reliability.harness import SERVING, finished_count, wait_pool_idle
from tests.reliability.messages import PROMPTS, text_request, text_stub

pytestmark = pytest.mark.timeout(240)

REQUESTS = 500
CONCURRENCY = 50
STORM_TIMEOUT_S = 180.0
HEALTH_POLL_S = 0.1
MOMENTS = ("at_once", "early", "prefill", "decode")


async def cancel_one(stub, rng: random.Random, index: int) -> tuple[str, grpc.StatusCode]:
    """Start a stream and cancel it at a random moment; (moment, final status)."""
    moment = MOMENTS[index % len(MOMENTS)]
    prompt = f"{rng.choice(PROMPTS)} {' '.join(str(rng.randint(0, 999)) for _ in range(20))}"
    call = stub.Generate(text_request(prompt, 64, ignore_eos=True), timeout=60)
    if moment == "early":  # before the engine admitted it (tokenizing or waiting)
        await asyncio.sleep(rng.uniform(0, 0.005))
    elif moment == "prefill":  # while it is queued or being prefilled
        await asyncio.sleep(rng.uniform(0.005, 0.15))
    elif moment == "decode":  # after some tokens arrived
        try:
            for _ in range(rng.randint(1, 6)):
                if await call.read() is grpc.aio.EOF:
                    break
        except grpc.aio.AioRpcError as error:  # refused (queue full) before any token
            return moment, error.code()
    call.cancel()
    return moment, await call.code()


async def poll_health(addresses: list[str], statuses: list[int | None],
                      done: asyncio.Event) -> None:
    channels = [grpc.aio.insecure_channel(address) for address in addresses]
    try:
        while not done.is_set():
            for channel in channels:
                try:
                    reply = await health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=2)
                    statuses.append(reply.status)
                except grpc.aio.AioRpcError:
                    statuses.append(None)
            await asyncio.sleep(HEALTH_POLL_S)
    finally:
        for channel in channels:
            await channel.close()


async def storm(tokenizer_address: str, engine_address: str,
                statuses: list[int | None]) -> list[tuple[str, grpc.StatusCode]]:
    rng = random.Random(500)
    gate = asyncio.Semaphore(CONCURRENCY)
    done = asyncio.Event()
    poller = asyncio.create_task(poll_health([tokenizer_address, engine_address], statuses,
                                             done))
    async with grpc.aio.insecure_channel(tokenizer_address) as channel:
        stub = text_stub(channel)

        async def gated(index: int) -> tuple[str, grpc.StatusCode]:
            async with gate:
                return await cancel_one(stub, rng, index)

        try:
            return await asyncio.wait_for(
                asyncio.gather(*(gated(i) for i in range(REQUESTS))), STORM_TIMEOUT_S)
        finally:
            done.set()
            await poller


def test_cancellation_storm_leaks_nothing(stack) -> None:
    engine, tokenizer = stack.engine, stack.tokenizer
    log_starts = {proc.name: proc.log_size() for proc in (engine, tokenizer)}
    aborted_before = finished_count(engine, "aborted")
    statuses: list[int | None] = []
    results = asyncio.run(storm(tokenizer.address, engine.address, statuses))

    codes = Counter(code for _, code in results)
    assert len(results) == REQUESTS
    # RESOURCE_EXHAUSTED: aborted requests hold their queue place until the engine's next step
    assert set(codes) <= {grpc.StatusCode.CANCELLED, grpc.StatusCode.OK,
                          grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert codes[grpc.StatusCode.CANCELLED] >= REQUESTS * 0.9, codes
    assert statuses and all(status == SERVING for status in statuses), Counter(statuses)

    state = wait_pool_idle(engine, timeout=15)
    assert state == {"kv_pool_used_tokens": 0, "requests_running": 0, "requests_waiting": 0}
    frontend = scrape(tokenizer.metrics_port)
    assert metric_value(frontend, "llmserve_frontend_inflight_requests") == 0
    aborted = finished_count(engine, "aborted") - aborted_before
    assert aborted > 0  # cancellations reached the engine as aborts
    for proc in (engine, tokenizer):
        assert proc.crash_lines(log_starts[proc.name]) == [], proc.name
    print(f"\ncancellation storm: {codes[grpc.StatusCode.CANCELLED]} cancelled, "
          f"{codes[grpc.StatusCode.OK]} finished first, "
          f"{codes[grpc.StatusCode.RESOURCE_EXHAUSTED]} refused; {aborted:.0f} engine aborts; "
          f"{len(statuses)} health checks all SERVING; kv used after = "
          f"{state['kv_pool_used_tokens']:.0f}")
