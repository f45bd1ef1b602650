"""Settings of the tokenizer service and the command line that fills them."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path


@dataclass(slots=True)
class FrontendConfig:
    """Everything `python -m tokenizer_svc` can be told."""

    model_dir: Path
    engine_address: str = "127.0.0.1:50052"
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 8001  # 0 picks a free port; -1 disables the metrics endpoint
    max_concurrent: int = 256
    default_max_new_tokens: int = 256
    grace_period_s: float = 30.0
    engine_poll_interval_s: float = 0.5
    engine_info_max_backoff_s: float = 2.0
    abort_drain_timeout_s: float = 0.5

    def validate(self) -> None:
        """Raise ValueError naming the first setting that is out of range."""
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in [0, 65535], got {self.port}")
        if not -1 <= self.metrics_port <= 65535:
            raise ValueError(f"--metrics-port must be in [-1, 65535], got {self.metrics_port}")
        if ":" not in self.engine_address:
            raise ValueError(f"--engine must be HOST:PORT, got {self.engine_address!r}")
        if self.max_concurrent < 1:
            raise ValueError(f"--max-concurrent must be >= 1, got {self.max_concurrent}")
        if self.default_max_new_tokens < 1:
            raise ValueError(
                f"--default-max-new-tokens must be >= 1, got {self.default_max_new_tokens}")
        for flag, value in (("--grace-period", self.grace_period_s),
                            ("--engine-poll-interval", self.engine_poll_interval_s)):
            if value <= 0:
                raise ValueError(f"{flag} must be > 0 seconds, got {value}")


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
    parser.add_argument("--engine", default="127.0.0.1:50052", metavar="HOST:PORT",
                        help="address of the engine's gRPC server (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to serve gRPC on; 0.0.0.0 for all (default: %(default)s)")
    parser.add_argument("--port", type=int, default=50051,
                        help="gRPC port of the public API; 0 picks a free one "
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
                        help="how often the engine's grpc.health.v1 status is polled; this "
                             "service reports NOT_SERVING while the engine is not serving "
                             "(default: %(default)s)")
    return parser


def config_from_args(argv: list[str] | None = None) -> FrontendConfig:
    """Parse the command line into a validated FrontendConfig."""
    args = build_arg_parser().parse_args(argv)
    config = FrontendConfig(
        model_dir=args.model, engine_address=args.engine, host=args.host, port=args.port,
        metrics_port=args.metrics_port, max_concurrent=args.max_concurrent,
        default_max_new_tokens=args.default_max_new_tokens, grace_period_s=args.grace_period,
        engine_poll_interval_s=args.engine_poll_interval)
    config.validate()
    return config
