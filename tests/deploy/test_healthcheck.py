"""deploy/healthcheck.py as Docker runs it: exit 0 only while the server reports SERVING."""
from __future__ import annotations

import subprocess
import sys
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.deploy.compose import DEPLOY_DIR
from tests.e2e.services import free_port

SCRIPT = DEPLOY_DIR / "healthcheck.py"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def health_server():
    """A loopback gRPC server with only the standard health service; yields (address, servicer)."""
    servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(grace=None)


def run_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=60)


def test_exit_code_follows_the_serving_status(health_server):
    address, servicer = health_server
    servicer.set("", NOT_SERVING)
    not_serving = run_check(address)
    servicer.set("", SERVING)
    serving = run_check(address)
    assert (not_serving.returncode, serving.returncode) == (1, 0)
    assert "NOT_SERVING" in not_serving.stderr
    assert serving.stderr == ""


def test_named_service_is_checked_not_the_server(health_server):
    address, servicer = health_server
    servicer.set("", SERVING)
    servicer.set("llmserve.v1.Engine", NOT_SERVING)
    assert run_check(address, "--service", "llmserve.v1.Engine").returncode == 1
    assert run_check(address, "--service", "no.such.Service").returncode == 1
    servicer.set("llmserve.v1.Engine", SERVING)
    assert run_check(address, "--service", "llmserve.v1.Engine").returncode == 0


def test_unreachable_server_is_unhealthy_within_the_timeout():
    result = run_check(f"127.0.0.1:{free_port()}", "--timeout", "1")
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr or "DEADLINE_EXCEEDED" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["localhost"], "HOST:PORT"),
    (["127.0.0.1:0"], "1..65535"),
    (["127.0.0.1:http"], "1..65535"),
    (["127.0.0.1:50051", "--timeout", "0"], "--timeout"),
    ([], ""),
])
def test_bad_arguments_are_unhealthy_never_exit_2(args, message):
    result = run_check(*args)
    assert result.returncode == 1
    assert message in result.stderr
