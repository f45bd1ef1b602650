"""Both services as real processes on loopback, with TLS-aware health checks, pool and log checks.

Builds on tests/e2e/services.py (free ports, metrics scraping) and adds what the reliability
suite needs: channel credentials and metadata per process, kill -9, restart on the same port,
log scanning for crashes, and "is the KV pool idle" from the engine's metrics.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.e2e.services import REPO_ROOT, free_port, metric_value, scrape, stop_process

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Small limits keep every test fast on a 2-core CPU (prompt + output <= 512 tokens).
ENGINE_ARGS = ("--dtype", "float32", "--max-model-len", "512", "--kv-capacity-tokens", "2048",
               "--max-num-seqs", "16", "--max-queue", "256", "--max-num-batched-tokens", "512")
MAX_MODEL_LEN = 512
CRASH_PATTERN = re.compile(r"Traceback|\bERROR\b|\bCRITICAL\b|Exception in callback|"
                           r"Segmentation fault|core dumped")


@dataclass
class Proc:
    """One service process, where it listens and how to talk to it."""

    name: str
    args: list[str]
    port: int
    metrics_port: int
    log_path: Path
    credentials: grpc.ChannelCredentials | None = None
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def spawn(self) -> "Proc":
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
                   TOKENIZERS_PARALLELISM="false", **self.env)
        log = open(self.log_path, "a")
        self.process = subprocess.Popen(self.args, cwd=REPO_ROOT, env=env, stdout=log,
                                        stderr=subprocess.STDOUT)
        log.close()
        return self

    def channel(self) -> grpc.Channel:
        if self.credentials is None:
            return grpc.insecure_channel(self.address)
        return grpc.secure_channel(self.address, self.credentials)

    def aio_channel(self) -> grpc.aio.Channel:
        if self.credentials is None:
            return grpc.aio.insecure_channel(self.address)
        return grpc.aio.secure_channel(self.address, self.credentials)

    def health(self, timeout: float = 1.0) -> int | None:
        """grpc.health.v1 status of the whole server, None when unreachable."""
        with self.channel() as channel:
            try:
                return health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=timeout).status
            except grpc.RpcError:
                return None

    def wait_health(self, status: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.process.returncode}):\n"
                                   f"{self.log_text()[-3000:]}")
            if self.health(timeout=0.5) == status:
                return
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} health never became {status} in {timeout} s:\n"
                           f"{self.log_text()[-3000:]}")

    def wait_serving(self, timeout: float = 120.0) -> "Proc":
        self.wait_health(SERVING, timeout)
        return self

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait; SIGKILL if it does not exit. The exit code."""
        if self.process is None:
            return None
        return stop_process(self.process, timeout)

    def kill(self) -> None:
        """kill -9, like a crash."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_text(self, start: int = 0) -> str:
        with open(self.log_path, "rb") as log:
            log.seek(start)
            return log.read().decode(errors="replace")

    def crash_lines(self, start: int = 0) -> list[str]:
        """Log lines since byte offset `start` that point at a crash or an unhandled error."""
        return [line for line in self.log_text(start).splitlines() if CRASH_PATTERN.search(line)]


def engine_proc(model_dir: Path, log_dir: Path, *extra: str, port: int | None = None,
                credentials: grpc.ChannelCredentials | None = None) -> Proc:
    """An engine (not started) with the small limits of ENGINE_ARGS; `extra` overrides them."""
    port = port or free_port()
    metrics_port = free_port()
    args = [sys.executable, "-m", "engine_svc", "--model", str(model_dir), "--port", str(port),
            "--metrics-port", str(metrics_port), *ENGINE_ARGS, *extra]
    return Proc("engine", args, port, metrics_port, log_dir / f"engine-{port}.log", credentials)


def tokenizer_proc(model_dir: Path, engine_address: str, log_dir: Path, *extra: str,
                   credentials: grpc.ChannelCredentials | None = None,
                   env: dict[str, str] | None = None) -> Proc:
    """A tokenizer service (not started) in front of `engine_address`."""
    port, metrics_port = free_port(), free_port()
    args = [sys.executable, "-m", "tokenizer_svc", "--model", str(model_dir),
            "--engine", engine_address, "--port", str(port), "--metrics-port", str(metrics_port),
            "--engine-poll-interval", "0.2", "--grace-period", "20", "--http-port", "0", *extra]
    return Proc("tokenizer", args, port, metrics_port, log_dir / f"tokenizer-{port}.log",
                credentials, dict(env or {}))


def start_stack(model_dir: Path, log_dir: Path, engine_extra: Sequence[str] = (),
                tokenizer_extra: Sequence[str] = ()) -> tuple[Proc, Proc]:
    """Engine and tokenizer service, both SERVING (engine started first)."""
    engine = engine_proc(model_dir, log_dir, *engine_extra).spawn()
    tokenizer = tokenizer_proc(model_dir, engine.address, log_dir, *tokenizer_extra).spawn()
    try:
        engine.wait_serving()
        tokenizer.wait_serving()
    except BaseException:
        tokenizer.stop(timeout=5)
        engine.stop(timeout=5)
        raise
    return engine, tokenizer


def pool_state(engine: Proc) -> dict[str, float]:
    """KV rows held by requests, running and waiting requests, from the engine's metrics."""
    text = scrape(engine.metrics_port)
    return {name: metric_value(text, f"llmserve_{name}")
            for name in ("kv_pool_used_tokens", "requests_running", "requests_waiting")}


def wait_pool_idle(engine: Proc, timeout: float = 10.0) -> dict[str, float]:
    """Poll until no request holds KV rows or is queued; returns the last state seen."""
    deadline = time.monotonic() + timeout
    while True:
        state = pool_state(engine)
        if not any(state.values()) or time.monotonic() > deadline:
            return state
        time.sleep(0.05)


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
    """Poll `predicate()` until it is true or `timeout` passes; its last value."""
    deadline = time.monotonic() + timeout
    while not (ok := bool(predicate())) and time.monotonic() < deadline:
        time.sleep(interval)
    return ok


def finished_count(engine: Proc, reason: str) -> float:
    text = scrape(engine.metrics_port)
    return metric_value(text, f'llmserve_requests_finished_total{{reason="{reason}"}}')
