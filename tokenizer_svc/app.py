"""Lifecycle of the tokenizer service: start, follow the engine's health, drain on signals."""
from __future__ import annotations

import asyncio
import logging
import signal

from grpc_health.v1 import health

from tokenizer_svc.config import FrontendConfig
from tokenizer_svc.engine_client import EngineClient
from tokenizer_svc.frontend import EngineState, FrontendCore
from tokenizer_svc.metrics import FrontendMetrics
from tokenizer_svc.schema import ServiceError
from tokenizer_svc.security import ApiKeyInterceptor, channel_credentials, server_credentials
from tokenizer_svc.server import TextGenerationServicer, build_grpc_server, publish_health
from tokenizer_svc.tokenizer import ModelTokenizer

log = logging.getLogger("tokenizer_svc")


class EngineMonitor:
    """Loads the engine's info (retrying while it is down), then polls its health and mirrors
    it into this service's health: NOT_SERVING while the engine is unreachable or not serving."""

    def __init__(self, engine: EngineClient, state: EngineState,
                 health_servicer: health.aio.HealthServicer, config: FrontendConfig) -> None:
        self._engine = engine
        self._state = state
        self._health = health_servicer
        self._config = config
        self.engine_serving: bool | None = None

    async def run(self) -> None:
        """Runs until cancelled."""
        await publish_health(self._health, False)
        self._state.limits = await self._engine.wait_for_info(
            self._config.engine_info_max_backoff_s)
        log.info("engine at %s: %s", self._engine.address, self._state.limits)
        while True:
            await self.poll_once()
            await asyncio.sleep(self._config.engine_poll_interval_s)

    async def poll_once(self) -> None:
        """One health check; on a change, refresh the engine's info and publish the status."""
        serving = await self._engine.is_serving(timeout_s=max(0.5,
                                                              self._config.engine_poll_interval_s))
        if serving and self.engine_serving is False:
            try:  # the engine came back: it may have restarted with other limits
                self._state.limits = await self._engine.fetch_info()
            except ServiceError:
                serving = False
        if serving != self.engine_serving:
            if self.engine_serving is not None or not serving:
                log.warning("engine at %s is %s", self._engine.address,
                            "serving" if serving else "NOT serving")
            self.engine_serving = serving
            await publish_health(self._health, serving)


class FrontendServer:
    """The running tokenizer service: gRPC server, metrics endpoint and engine monitor."""

    def __init__(self, config: FrontendConfig, tokenizer: ModelTokenizer,
                 metrics: FrontendMetrics | None = None) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.metrics = metrics or FrontendMetrics()
        self.engine = EngineClient(
            config.engine_address,
            channel_credentials(config.engine_tls_ca, config.engine_tls_cert,
                                config.engine_tls_key) if config.engine_uses_tls else None,
            config.engine_tls_server_name)
        self.engine_state = EngineState(config.engine_address)
        self.port = 0
        self.metrics_port = 0
        self._monitor_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Bind, start serving (health NOT_SERVING until the engine answers), start the monitor."""
        self.health = health.aio.HealthServicer()
        self.core = FrontendCore(self.config, self.tokenizer, self.engine, self.engine_state,
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
        await publish_health(self.health, False)
        await self._server.start()
        if self.config.metrics_port >= 0:
            self.metrics_port = self.metrics.serve_http(self.config.metrics_port,
                                                        self.config.host)
        monitor = EngineMonitor(self.engine, self.engine_state, self.health, self.config)
        self.monitor = monitor
        self._monitor_task = asyncio.create_task(monitor.run(), name="engine-monitor")

    async def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING, refuse new calls, let in-flight streams finish within grace_s."""
        await self.health.enter_graceful_shutdown()
        await self._server.stop(self.config.grace_period_s if grace_s is None else grace_s)
        if self._monitor_task is not None:
            self._monitor_task.cancel()
            await asyncio.gather(self._monitor_task, return_exceptions=True)
        await self.engine.close()
        await asyncio.to_thread(self.metrics.stop_http)


async def serve(config: FrontendConfig) -> int:
    """Run the service until SIGTERM/SIGINT, then drain and return the exit code 0."""
    tokenizer = ModelTokenizer.from_pretrained(config.model_dir)
    server = FrontendServer(config, tokenizer)
    await server.start()
    log.info("tokenizer_svc serving llmserve.v1.TextGeneration on %s:%d (%s%s; metrics :%s), "
             "engine at %s (%s)", config.host, server.port,
             "TLS" if config.tls_cert else "plaintext",
             ", client certificates required" if config.tls_ca else "",
             server.metrics_port if config.metrics_port >= 0 else "off", config.engine_address,
             "TLS" if config.engine_uses_tls else "plaintext")
    if config.api_key:
        log.info("API key required on llmserve.v1.TextGeneration (health/reflection open)")
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    await stop_requested.wait()
    log.info("signal received: draining in-flight streams (grace %.1f s)", config.grace_period_s)
    await server.stop()
    log.info("tokenizer_svc stopped")
    return 0
