"""uvicorn serving the OpenAI HTTP app inside the tokenizer service's own event loop.

The gRPC server and this one share the loop (and so the FrontendCore, its in-flight set and
metrics). The socket is bound here, so a taken port fails start() like a gRPC bind failure
does, and uvicorn leaves the process's signal handlers and logging alone.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable, Iterator

import uvicorn

from tokenizer_svc.config import FrontendConfig

log = logging.getLogger("tokenizer_svc")


class _EmbeddedServer(uvicorn.Server):
    """uvicorn.Server that does not take over SIGINT/SIGTERM (app.serve drains on them)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port; RuntimeError naming the address when it is taken."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    # SO_REUSEADDR allows a restart while old connections sit in TIME_WAIT; without
    # SO_REUSEPORT a second process still cannot bind the port.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        raise RuntimeError(f"cannot bind HTTP to {host}:{port}: {error}") from None
    sock.listen(1024)
    sock.setblocking(False)
    return sock


class HttpServer:
    """The OpenAI-compatible HTTP API on --host:--http-port (TLS with the --tls-* flags)."""

    def __init__(self, app: Callable, config: FrontendConfig) -> None:
        self._app = app
        self._config = config
        self._task: asyncio.Task[None] | None = None
        self._server: _EmbeddedServer | None = None
        self.port = 0

    def _uvicorn_config(self) -> uvicorn.Config:
        config = self._config
        tls = {}
        if config.tls_cert is not None:
            tls = dict(ssl_certfile=str(config.tls_cert), ssl_keyfile=str(config.tls_key),
                       ssl_ca_certs=None if config.tls_ca is None else str(config.tls_ca),
                       ssl_cert_reqs=ssl.CERT_REQUIRED if config.tls_ca else ssl.CERT_NONE)
        return uvicorn.Config(self._app, lifespan="off", log_config=None, log_level="warning",
                              access_log=False, server_header=False, proxy_headers=False,
                              timeout_graceful_shutdown=int(max(1, config.grace_period_s)),
                              **tls)

    async def start(self) -> int:
        """Bind and start serving; returns the bound port."""
        sock = bind_socket(self._config.host, self._config.http_port)
        self.port = sock.getsockname()[1]
        self._server = _EmbeddedServer(self._uvicorn_config())
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="http-api")
        while not self._server.started:
            if self._task.done():  # e.g. a TLS key that does not load
                self._task.result()
                raise RuntimeError("HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        return self.port

    async def stop(self, grace_s: float) -> None:
        """Stop accepting, let running responses finish within grace_s, then cancel them."""
        if self._server is None or self._task is None:
            return
        # uvicorn reports a zero timeout as exceeded even with nothing running: 0.1 s at least.
        self._server.config.timeout_graceful_shutdown = max(0.1, grace_s)  # type: ignore
        self._server.should_exit = True
        try:
            await self._task
        except Exception:  # noqa: BLE001
            log.exception("HTTP server did not shut down cleanly")
        self._server = self._task = None
