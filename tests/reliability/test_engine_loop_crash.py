"""A crash inside the engine loop (an exception from `engine.step()`) must not wedge the server:
open streams fail at once, health goes NOT_SERVING, new requests are refused, and `serve`
returns exit status 1 so a supervisor restarts the process (instead of hanging forever).

Runs `engine_svc.server.serve` in this process with a real engine whose `step` starts raising
on demand (no fault-injection hook in the product code).
"""
from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.e2e.services import free_port
from tests.reliability.messages import collect_async, engine_request, engine_stub

pytestmark = pytest.mark.timeout(120)


class InjectedFault(RuntimeError):
    """The exception the patched step raises."""


async def _wait_serving(channel: grpc.aio.Channel, timeout_s: float = 60.0) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.05)
    raise TimeoutError("engine never SERVING")


async def _health(channel: grpc.aio.Channel) -> int | None:
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=1)
    except grpc.aio.AioRpcError:
        return None
    return reply.status


def test_engine_loop_crash_fails_streams_goes_not_serving_and_exits_1(default_model_dir) -> None:
    from engine_svc.server import serve
    from tests.engine.helpers import make_engine

    engine = make_engine(default_model_dir, max_model_len=256, kv_capacity_tokens=512)
    real_step, broken = engine.step, {"now": False}

    def step():
        if broken["now"]:
            raise InjectedFault("injected failure in step()")
        return real_step()

    engine.step = step
    port = free_port()

    async def scenario() -> dict:
        server = asyncio.create_task(serve(engine, host="127.0.0.1", port=port, metrics_port=None,
                                           model_name="crash-test", drain_timeout=5.0))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await _wait_serving(channel)
            stub = engine_stub(channel)
            call = stub.Generate(engine_request(max_new_tokens=200, ignore_eos=True), timeout=30)
            first = await call.read()
            broken["now"] = True
            in_flight = await collect_async(call)
            health_after = await _health(channel)
            later = await collect_async(stub.Generate(engine_request(), timeout=10))
            exit_status = await asyncio.wait_for(server, timeout=30)
        return dict(first=first, in_flight=in_flight, health=health_after, later=later,
                    exit_status=exit_status)

    result = asyncio.run(scenario())
    assert result["first"].token_ids  # it was streaming before the fault
    assert result["in_flight"].code == grpc.StatusCode.INTERNAL
    assert "InjectedFault" in result["in_flight"].details
    assert result["health"] in (health_pb2.HealthCheckResponse.NOT_SERVING, None)
    assert result["later"].code == grpc.StatusCode.UNAVAILABLE  # refused, not hanging
    assert result["exit_status"] == 1
