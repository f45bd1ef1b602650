"""Start the real engine and tokenizer services as processes on loopback, for e2e tests."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.common import free_port  # noqa: F401  (tests import it from here)

REPO_ROOT = Path(__file__).resolve().parents[2]


def stop_process(process: subprocess.Popen, timeout: float = 30.0) -> int:
    """SIGTERM, wait up to `timeout`, then SIGKILL; returns the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def health_status(address: str, service: str = "", timeout: float = 1.0) -> int | None:
    """The grpc.health.v1 status of `service` at `address`, or None when unreachable."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return None
    return reply.status


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return reply.read().decode()


def metric_value(text: str, name: str) -> float:
    """Sum of the samples of `name` (exact series name, any labels) in a scrape."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    if not found:
        raise KeyError(name)
    return total


@dataclass
class Service:
    """One service process and where it listens."""

    name: str
    process: subprocess.Popen
    port: int
    metrics_port: int
    log_path: Path
    statuses: list[int | None] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_serving(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.process.returncode}):\n"
                                   f"{self.log_path.read_text()[-3000:]}")
            status = health_status(self.address, timeout=0.5)
            self.statuses.append(status)
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} not SERVING after {timeout} s:\n"
                           f"{self.log_path.read_text()[-3000:]}")

    def stop(self, timeout: float = 30.0) -> int:
        return stop_process(self.process, timeout)


def start_engine(model_dir: Path, log_dir: Path, *extra: str, port: int | None = None) -> Service:
    port = port or free_port()
    metrics_port = free_port()
    log_path = log_dir / f"engine-{port}.log"
    args = [sys.executable, "-m", "engine_svc", "--model", str(model_dir), "--port", str(port),
            "--metrics-port", str(metrics_port), "--dtype", "float32", "--max-model-len", "1024",
            "--kv-capacity-tokens", "8192", "--max-num-seqs", "32", *extra]
    return Service("engine", _spawn(args, log_path), port, metrics_port, log_path)


def start_tokenizer(model_dir: Path, engine_address: str, log_dir: Path, *extra: str) -> Service:
    port, metrics_port = free_port(), free_port()
    log_path = log_dir / f"tokenizer-{port}.log"
    args = [sys.executable, "-m", "tokenizer_svc", "--model", str(model_dir),
            "--engine", engine_address, "--port", str(port), "--metrics-port", str(metrics_port),
            "--http-port", "0", *extra]  # HTTP off unless extra asks (the last flag wins)
    return Service("tokenizer", _spawn(args, log_path), port, metrics_port, log_path)


def _spawn(args: list[str], log_path: Path) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    log = open(log_path, "w")
    return subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


@contextmanager
def engine_and_http_front(model_dir: Path, log_dir: Path) -> Iterator[tuple[Service, Service, str]]:
    """A real engine + tokenizer service with the OpenAI HTTP API on a free port:
    (engine, tokenizer, the API's base URL ending in /v1); both stopped on exit."""
    engine = start_engine(model_dir, log_dir)
    tokenizer = None
    try:
        engine.wait_serving()
        http_port = free_port()
        tokenizer = start_tokenizer(model_dir, engine.address, log_dir,
                                    "--http-port", str(http_port))
        tokenizer.wait_serving()
        yield engine, tokenizer, f"http://127.0.0.1:{http_port}/v1"
    finally:
        if tokenizer is not None:
            tokenizer.stop()
        engine.stop()
