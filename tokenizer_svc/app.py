"""Lifecycle of the tokenizer service: start, follow the engines' health, drain on signals."""
from __future__ import annotations

import asyncio
import logging
import signal
from typing import TYPE_CHECKING

from grpc_health.v1 import health

from tokenizer_svc.config import FrontendConfig
from tokenizer_svc.engine_client import EngineClient
from tokenizer_svc.engine_pool import EnginePool
from tokenizer_svc.frontend import EngineState, FrontendCore
from tokenizer_svc.metrics import FrontendMetrics
from tokenizer_svc.security import ApiKeyInterceptor, channel_credentials, server_credentials
from tokenizer_svc.router import Router
from tokenizer_svc.server import TextGenerationServicer, build_grpc_server, publish_health

if TYPE_CHECKING:
    from tokenizer_svc.http_server import HttpServer
from tokenizer_svc.tokenizer import ModelTokenizer

log = logging.getLogger("tokenizer_svc")


class ServiceHealth:
    """This service's health: grpc.health.v1 plus a flag the HTTP /health route reads."""

    def __init__(self) -> None:
        self.servicer = health.aio.HealthServicer()
        self.serving = False
        self._draining = False

    async def publish(self, serving: bool) -> None:
        if self._draining:
            return
        self.serving = serving
        await publish_health(self.servicer, serving)

    async def shut_down(self) -> None:
        """NOT_SERVING for good (a drain has begun)."""
        self._draining = True
        self.serving = False
        await self.servicer.enter_graceful_shutdown()


class FrontendServer:
    """The running tokenizer service: gRPC server, OpenAI HTTP server (unless --http-port 0),
    metrics endpoint and the engine pool, all on one event loop around one FrontendCore."""

    def __init__(self, config: FrontendConfig, tokenizer: ModelTokenizer,
                 metrics: FrontendMetrics | None = None) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.metrics = metrics or FrontendMetrics()
        targets = config.engine_targets
        self.engine_state = EngineState(targets.describe())
        self.engines = EnginePool(targets, config, Router(config.router_config), self.metrics,
                                  self._engine_client, self.engine_state, self._publish_health)
        self.port = 0
        self.http_port = 0
        self.metrics_port = 0
        self._http: HttpServer | None = None

    def _engine_client(self, address: str) -> EngineClient:
        config = self.config
        return EngineClient(
            address, channel_credentials(config.engine_tls_ca, config.engine_tls_cert,
                                         config.engine_tls_key) if config.engine_uses_tls
            else None, config.engine_tls_server_name)

    async def _publish_health(self, serving: bool) -> None:
        await self.service_health.publish(serving)

    async def start(self) -> None:
        """Bind, start serving (health NOT_SERVING until an engine serves), start the pool;
        ValueError when the engines that answer serve different models."""
        self.service_health = ServiceHealth()
        self.health = self.service_health.servicer
        self.core = FrontendCore(self.config, self.tokenizer, self.engines, self.engine_state,
                                 self.metrics)
        servicer = TextGenerationServicer(self.core)
        interceptors = [ApiKeyInterceptor(self.config.api_key)] if self.config.api_key else []
        self._server = build_grpc_server(servicer, self.health, self.config.max_message_bytes,
                                         interceptors)
        address = f"{self.config.host}:{self.config.port}"
        credentials = server_credentials(self.config.tls_cert, self.config.tls_key,
                                         self.config.tls_ca)
        self.port = (self._server.add_secure_port(address, credentials) if credentials
                     else self._server.add_insecure_port(address))
        if self.port == 0:
            raise RuntimeError(f"cannot bind gRPC to {address}")
        await self.service_health.publish(False)
        await self._server.start()
        if self.config.http_port:
            await self._start_http()
        if self.config.metrics_port >= 0:
            self.metrics_port = self.metrics.serve_http(self.config.metrics_port,
                                                        self.config.host)
        try:
            await self.engines.start()
        except BaseException:
            await self.stop(0)
            raise

    async def _start_http(self) -> None:
        from tokenizer_svc.http_api import build_app  # FastAPI only when HTTP is on
        from tokenizer_svc.http_server import HttpServer

        self._http = HttpServer(build_app(self.core, lambda: self.service_health.serving),
                                self.config)
        try:
            self.http_port = await self._http.start()
        except BaseException:
            await self._server.stop(0)
            raise

    async def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING, refuse new calls, let in-flight streams finish within grace_s."""
        grace_s = self.config.grace_period_s if grace_s is None else grace_s
        await self.service_health.shut_down()
        await asyncio.gather(self._server.stop(grace_s),
                             self._http.stop(grace_s) if self._http else asyncio.sleep(0))
        await self.engines.close()
        await asyncio.to_thread(self.metrics.stop_http)


async def serve(config: FrontendConfig) -> int:
    """Run the service until SIGTERM/SIGINT, then drain and return the exit code 0."""
    tokenizer = ModelTokenizer.from_pretrained(config.model_dir)
    server = FrontendServer(config, tokenizer)
    await server.start()
    log.info("tokenizer_svc serving llmserve.v1.TextGeneration on %s:%d (%s%s; metrics :%s), "
             "engines at %s (%s, routing %s)", config.host, server.port,
             "TLS" if config.tls_cert else "plaintext",
             ", client certificates required" if config.tls_ca else "",
             server.metrics_port if config.metrics_port >= 0 else "off", config.engine_address,
             "TLS" if config.engine_uses_tls else "plaintext", config.routing)
    if server.http_port:
        log.info("OpenAI-compatible HTTP API on %s://%s:%d/v1", "https" if config.tls_cert
                 else "http", config.host, server.http_port)
    if config.api_key:
        log.info("API key required on llmserve.v1.TextGeneration (health/reflection open) "
                 "and on HTTP (all but /health)")
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    await stop_requested.wait()
    log.info("signal received: draining in-flight streams (grace %.1f s)", config.grace_period_s)
    await server.stop()
    log.info("tokenizer_svc stopped")
    return 0
