"""Prometheus metrics of the tokenizer service (own registry; names are the DESIGN.md contract).

Every request series carries `protocol` ("grpc" or "http"): which edge the request came in
through. The engine pool's series carry `engine` (the engine's address) instead, and routing
decisions their `reason` (router.REASONS).
"""
from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0)
TOKENIZE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.25)
PROTOCOLS = ("grpc", "http")


class FrontendMetrics:
    """The frontend's counters, gauges and histograms in a private CollectorRegistry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests_total = Counter(
            "llmserve_frontend_requests",
            "Generate requests finished, by gRPC status name (HTTP too) and protocol",
            ["status", "protocol"], registry=self.registry)
        self.request_latency_seconds = Histogram(
            "llmserve_frontend_request_latency_seconds",
            "Generate latency from request arrival to the last message",
            ["protocol"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.time_to_first_token_seconds = Histogram(
            "llmserve_frontend_time_to_first_token_seconds",
            "Time from request arrival to the first generated token sent",
            ["protocol"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tokenize_seconds = Histogram(
            "llmserve_frontend_tokenize_seconds",
            "Time to render the chat template and tokenize one prompt",
            ["protocol"], buckets=TOKENIZE_BUCKETS, registry=self.registry)
        self.inflight_requests = Gauge(
            "llmserve_frontend_inflight_requests", "Generate streams in progress",
            ["protocol"], registry=self.registry)
        self._add_engine_pool_metrics()
        for protocol in PROTOCOLS:  # every protocol's series exists from the start (at 0)
            for family in (self.request_latency_seconds, self.time_to_first_token_seconds,
                           self.tokenize_seconds, self.inflight_requests):
                family.labels(protocol)
        self._http_server: WSGIServer | None = None

    def _add_engine_pool_metrics(self) -> None:
        self.engine_requests_total = Counter(
            "llmserve_frontend_engine_requests",
            "Generate calls sent to each engine (a failover's resubmission counts again)",
            ["engine"], registry=self.registry)
        self.engine_inflight_requests = Gauge(
            "llmserve_frontend_engine_inflight_requests",
            "Generate calls open on each engine (the router's outstanding load)",
            ["engine"], registry=self.registry)
        self.engine_errors_total = Counter(
            "llmserve_frontend_engine_errors",
            "Generate calls to each engine that failed, by gRPC status name (cancelled: the "
            "front gave up on a stalled engine)", ["engine", "code"], registry=self.registry)
        self.engine_serving = Gauge(
            "llmserve_frontend_engine_serving",
            "1 while the engine is SERVING, answers and serves the agreed model; else 0",
            ["engine"], registry=self.registry)
        self.failovers_total = Counter(
            "llmserve_frontend_failovers",
            "Streams moved off an engine that failed mid-request (resubmitted elsewhere with "
            "the tokens so far)", ["engine"], registry=self.registry)
        self.routing_decisions_total = Counter(
            "llmserve_frontend_routing_decisions",
            "Engine choices by reason: prefix (rendezvous top choice), prefix_overflow (a "
            "lower-ranked engine: the top one was over the load bound), least_loaded, "
            "round_robin", ["reason"], registry=self.registry)

    def forget_engine(self, engine: str) -> None:
        """Drop an engine's series (it left the DNS answer)."""
        for family in (self.engine_requests_total, self.engine_inflight_requests,
                       self.engine_serving, self.failovers_total):
            try:
                family.remove(engine)
            except KeyError:
                pass
        errors = self.engine_errors_total
        for labels in [k for k in errors._metrics if k[0] == engine]:  # noqa: SLF001
            errors.remove(*labels)

    def serve_http(self, port: int, host: str = "0.0.0.0") -> int:
        """Expose /metrics on host:port in a daemon thread; return the bound port."""
        http_server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http_server = http_server
        return int(http_server.server_port)

    def stop_http(self) -> None:
        """Shut the metrics HTTP server down if it was started."""
        http_server, self._http_server = self._http_server, None
        if http_server is not None:
            http_server.shutdown()  # waits for the serving thread's loop to exit (<= 0.5 s)
            http_server.server_close()
