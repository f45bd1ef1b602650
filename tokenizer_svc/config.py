"""Settings of the tokenizer service and the command line that fills them."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from tokenizer_svc.engine_targets import EngineTargets, parse_engine_targets
from tokenizer_svc.router import ROUTING_MODES, RouterConfig

API_KEY_ENV = "LLMSERVE_API_KEY"  # the API key without putting it on the command line
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024


@dataclass(slots=True)
class FrontendConfig:
    """Everything `python -m tokenizer_svc` can be told."""

    model_dir: Path
    engine_address: str = "127.0.0.1:50052"
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 8001  # 0 picks a free port; -1 disables the metrics endpoint
    http_port: int = 8000  # the OpenAI-compatible HTTP API; 0 turns it off
    max_concurrent: int = 256
    default_max_new_tokens: int = 256
    grace_period_s: float = 30.0
    engine_poll_interval_s: float = 0.5
    engine_info_max_backoff_s: float = 2.0
    abort_drain_timeout_s: float = 0.5
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None  # set: clients must present a certificate signed by it
    engine_tls_ca: Path | None = None
    engine_tls_cert: Path | None = None
    engine_tls_key: Path | None = None
    engine_tls_server_name: str | None = None
    api_key: str | None = None
    routing: str = "prefix"
    routing_prefix_blocks: int = 4
    max_engine_retries: int = 2
    engine_stall_timeout_s: float = 5.0
    dns_refresh_interval_s: float = 5.0

    def validate(self) -> None:
        """Raise ValueError naming the first setting that is out of range."""
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in [0, 65535], got {self.port}")
        if not 0 <= self.http_port <= 65535:
            raise ValueError(f"--http-port must be in [0, 65535] (0 = off), got {self.http_port}")
        if not -1 <= self.metrics_port <= 65535:
            raise ValueError(f"--metrics-port must be in [-1, 65535], got {self.metrics_port}")
        self.engine_targets  # noqa: B018  (ValueError naming --engine when malformed)
        self.router_config.validate()
        if self.max_engine_retries < 0:
            raise ValueError(f"--max-engine-retries must be >= 0, got {self.max_engine_retries}")
        if self.max_concurrent < 1:
            raise ValueError(f"--max-concurrent must be >= 1, got {self.max_concurrent}")
        if self.default_max_new_tokens < 1:
            raise ValueError(
                f"--default-max-new-tokens must be >= 1, got {self.default_max_new_tokens}")
        for flag, value in (("--grace-period", self.grace_period_s),
                            ("--engine-poll-interval", self.engine_poll_interval_s),
                            ("--engine-stall-timeout", self.engine_stall_timeout_s),
                            ("--dns-refresh-interval", self.dns_refresh_interval_s)):
            if value <= 0:
                raise ValueError(f"{flag} must be > 0 seconds, got {value}")
        if self.max_message_bytes < 1024:
            raise ValueError(f"--max-message-bytes must be >= 1024, got {self.max_message_bytes}")
        self._validate_tls()
        if self.api_key is not None and not self.api_key:
            raise ValueError(f"--api-key / {API_KEY_ENV} must not be empty")

    def _validate_tls(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key must be given together")
        if self.tls_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-ca (require client certificates) needs --tls-cert/--tls-key")
        if (self.engine_tls_cert is None) != (self.engine_tls_key is None):
            raise ValueError("--engine-tls-cert and --engine-tls-key must be given together")
        tls_files = {"--tls-cert": self.tls_cert, "--tls-key": self.tls_key,
                     "--tls-ca": self.tls_ca, "--engine-tls-ca": self.engine_tls_ca,
                     "--engine-tls-cert": self.engine_tls_cert,
                     "--engine-tls-key": self.engine_tls_key}
        for flag, path in tls_files.items():
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{flag} {path}: no such file")

    @property
    def engine_targets(self) -> EngineTargets:
        """--engine parsed: addresses, or a DNS name to resolve (ValueError when malformed)."""
        return parse_engine_targets(self.engine_address)

    @property
    def router_config(self) -> RouterConfig:
        return RouterConfig(mode=self.routing, prefix_blocks=self.routing_prefix_blocks)

    @property
    def engine_uses_tls(self) -> bool:
        """True when the engine channel is TLS (any --engine-tls-* flag given)."""
        return any(v is not None for v in (self.engine_tls_ca, self.engine_tls_cert,
                                           self.engine_tls_key))


def build_arg_parser() -> argparse.ArgumentParser:
    """The `python -m tokenizer_svc` command line."""
    parser = argparse.ArgumentParser(
        prog="python -m tokenizer_svc",
        description="llmserve front door: the public llmserve.v1.TextGeneration gRPC service. "
                    "Validates requests, applies the chat template, tokenizes, streams token ids "
                    "from the engine (llmserve.v1.Engine) and returns text deltas.")
    parser.add_argument("--model", required=True, type=Path, metavar="DIR",
                        help="Hugging Face model directory holding the tokenizer files "
                             "(tokenizer.json, tokenizer_config.json); the same model the engine "
                             "serves")
    parser.add_argument("--engine", default="127.0.0.1:50052", metavar="TARGET",
                        help="the engines' gRPC servers: HOST:PORT, a comma-separated list of "
                             "them, or dns:///NAME:PORT (every address of NAME, re-resolved; "
                             "a Kubernetes headless Service) (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to serve gRPC on; 0.0.0.0 for all (default: %(default)s)")
    parser.add_argument("--port", type=int, default=50051,
                        help="gRPC port of the public API; 0 picks a free one "
                             "(default: %(default)s)")
    parser.add_argument("--http-port", type=int, default=8000,
                        help="port of the OpenAI-compatible HTTP API (/v1/chat/completions, "
                             "/v1/completions, /v1/models, /health, /tokenize, /detokenize) on "
                             "--host, with the same TLS flags and API key; 0 turns it off "
                             "(default: %(default)s)")
    parser.add_argument("--metrics-port", type=int, default=8001,
                        help="HTTP port for Prometheus /metrics; 0 picks a free one, -1 turns it "
                             "off (default: %(default)s)")
    parser.add_argument("--max-concurrent", type=int, default=256, metavar="N",
                        help="Generate streams allowed at once; more are rejected with "
                             "RESOURCE_EXHAUSTED (default: %(default)s)")
    parser.add_argument("--default-max-new-tokens", type=int, default=256, metavar="N",
                        help="generation budget when a request leaves max_new_tokens unset "
                             "(always capped by the context left) (default: %(default)s)")
    parser.add_argument("--grace-period", type=float, default=30.0, metavar="SECONDS",
                        help="on SIGTERM/SIGINT, how long in-flight streams may run before they "
                             "are cancelled (default: %(default)s)")
    parser.add_argument("--engine-poll-interval", type=float, default=0.5, metavar="SECONDS",
                        help="first wait before reconnecting to an engine whose grpc.health.v1 "
                             "Watch broke (doubling up to 2 s); this service reports "
                             "NOT_SERVING while no engine is serving (default: %(default)s)")
    parser.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES,
                        metavar="N", help="largest gRPC message accepted or sent; bigger requests "
                        "fail with RESOURCE_EXHAUSTED (default: %(default)s)")
    _add_engine_pool_args(parser)
    _add_security_args(parser)
    return parser


def _add_engine_pool_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engines", "routing over several engines and failover")
    group.add_argument("--routing", choices=ROUTING_MODES, default="prefix",
                       help="prefix: requests sharing their first blocks of prompt tokens go to "
                            "the same engine (rendezvous hashing: every front agrees) unless "
                            "it has more than 2x + 4 the outstanding requests of the least "
                            "loaded; least-loaded; round-robin (default: %(default)s)")
    group.add_argument("--routing-prefix-blocks", type=int, default=4, metavar="K",
                       help="prefix routing hashes the prompt's first K blocks of 16 token ids "
                            "(default: %(default)s)")
    group.add_argument("--max-engine-retries", type=int, default=2, metavar="N",
                       help="engines a request may move to when its engine fails (mid-stream: "
                            "resubmitted with the tokens so far); past them UNAVAILABLE "
                            "(default: %(default)s)")
    group.add_argument("--engine-stall-timeout", type=float, default=5.0, metavar="SECONDS",
                       help="a stream on an engine that reports NOT_SERVING moves to another "
                            "engine once it gets nothing for this long (default: %(default)s)")
    group.add_argument("--dns-refresh-interval", type=float, default=5.0, metavar="SECONDS",
                       help="how often a dns:/// --engine name is resolved again "
                            "(default: %(default)s)")


def _add_security_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "security", "TLS for the public port, (mutual) TLS to the engine, and an API key")
    group.add_argument("--tls-cert", type=Path, metavar="PEM",
                       help="serve the public API (gRPC and HTTP: https) over TLS with this "
                            "certificate (chain)")
    group.add_argument("--tls-key", type=Path, metavar="PEM",
                       help="private key of --tls-cert")
    group.add_argument("--tls-ca", type=Path, metavar="PEM",
                       help="require clients to present a certificate signed by this CA "
                            "(mutual TLS on the public port)")
    group.add_argument("--engine-tls-ca", type=Path, metavar="PEM",
                       help="connect to the engine over TLS, trusting this CA for its "
                            "certificate")
    group.add_argument("--engine-tls-cert", type=Path, metavar="PEM",
                       help="client certificate presented to the engine (for an engine "
                            "started with --tls-ca: mutual TLS)")
    group.add_argument("--engine-tls-key", type=Path, metavar="PEM",
                       help="private key of --engine-tls-cert")
    group.add_argument("--engine-tls-server-name", metavar="NAME",
                       help="name to verify in the engine's certificate when it differs from "
                            "the host of --engine")
    group.add_argument("--api-key", metavar="KEY",
                       help=f"require metadata 'authorization: Bearer KEY' on every call except "
                            f"health and reflection (UNAUTHENTICATED otherwise), and the header "
                            f"'Authorization: Bearer KEY' on every HTTP route except /health "
                            f"(401 otherwise). Prefer the "
                            f"{API_KEY_ENV} environment variable: a flag shows in `ps`")


def config_from_args(argv: list[str] | None = None) -> FrontendConfig:
    """Parse the command line into a validated FrontendConfig."""
    args = build_arg_parser().parse_args(argv)
    config = FrontendConfig(
        model_dir=args.model, engine_address=args.engine, host=args.host, port=args.port,
        http_port=args.http_port, metrics_port=args.metrics_port,
        max_concurrent=args.max_concurrent, default_max_new_tokens=args.default_max_new_tokens, grace_period_s=args.grace_period,
        engine_poll_interval_s=args.engine_poll_interval, routing=args.routing,
        routing_prefix_blocks=args.routing_prefix_blocks,
        max_engine_retries=args.max_engine_retries,
        engine_stall_timeout_s=args.engine_stall_timeout,
        dns_refresh_interval_s=args.dns_refresh_interval,
        max_message_bytes=args.max_message_bytes, tls_cert=args.tls_cert, tls_key=args.tls_key,
        tls_ca=args.tls_ca, engine_tls_ca=args.engine_tls_ca,
        engine_tls_cert=args.engine_tls_cert, engine_tls_key=args.engine_tls_key,
        engine_tls_server_name=args.engine_tls_server_name,
        api_key=args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None)
    config.validate()
    return config
