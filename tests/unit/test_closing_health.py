"""The engine's health Watch streams end with OK at shutdown instead of being cancelled."""
from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine_svc.closing_health import ClosingHealthServicer

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _watch_until_closed(close: bool) -> tuple[list[int], grpc.StatusCode]:
    servicer = ClosingHealthServicer()
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await servicer.set("", SERVING)
    seen: list[int] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=10)

        async def read() -> None:
            async for reply in call:
                seen.append(reply.status)

        reader = asyncio.create_task(read())
        while not seen:
            await asyncio.sleep(0.01)
        await servicer.set("", NOT_SERVING)       # draining starts
        while len(seen) < 2:
            await asyncio.sleep(0.01)
        if close:
            servicer.close_watches()
        await server.stop(grace=0.5)
        try:
            await reader
        except grpc.aio.AioRpcError:
            pass
        code = await call.code()
    return seen, code


def test_close_watches_ends_open_watches_with_ok() -> None:
    seen, code = asyncio.run(_watch_until_closed(close=True))
    assert seen == [SERVING, NOT_SERVING]
    assert code == grpc.StatusCode.OK


def test_without_closing_the_server_cancels_the_watch() -> None:
    seen, code = asyncio.run(_watch_until_closed(close=False))
    assert seen == [SERVING, NOT_SERVING]
    assert code != grpc.StatusCode.OK   # what close_watches avoids (grpc logs it as an error)


def test_a_watch_after_closing_ends_at_once() -> None:
    async def body() -> grpc.StatusCode:
        servicer = ClosingHealthServicer()
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servicer.close_watches()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=""), timeout=5)
            replies = [reply async for reply in call]
            code = await call.code()
        await server.stop(None)
        assert replies == []
        return code

    assert asyncio.run(body()) == grpc.StatusCode.OK
