"""grpc.health.v1 whose Watch streams end cleanly when the server shuts down (gRPC edge).

grpcio's aio HealthServicer.Watch never returns: a Watch still open at shutdown (every tokenizer
service watches its engines) is cancelled by `server.stop()`, which grpc logs as an unhandled
error with a traceback. `close_watches()` ends each open Watch with OK instead; the watcher
has already seen NOT_SERVING (published when draining starts), then the stream's end.
"""
from __future__ import annotations

import asyncio
import contextlib

from grpc_health.v1 import health


class ClosingHealthServicer(health.aio.HealthServicer):
    """HealthServicer whose Watch streams `close_watches()` ends with OK."""

    def __init__(self) -> None:
        super().__init__()
        self._closing: asyncio.Event | None = None   # made on the serving loop, at first Watch

    async def Watch(self, request, context):  # noqa: N802 (grpc's method name)
        if self._closing is None:
            self._closing = asyncio.Event()
        if self._closing.is_set():
            return
        watching = asyncio.ensure_future(super().Watch(request, context))
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait({watching, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (watching, closing):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if watching.done() and not watching.cancelled() and watching.exception() is not None:
            raise watching.exception()

    def close_watches(self) -> None:
        """End every open Watch (and refuse new ones) with OK; call before server.stop()."""
        if self._closing is None:
            self._closing = asyncio.Event()
        self._closing.set()
