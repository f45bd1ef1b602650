"""Liveness that proves progress: an engine whose loop is wedged (fault injection: every step
blocks while a file exists, LLMSERVE_FAULT_STALL_FILE) reports NOT_SERVING within
--stall-timeout, counts the stall once, logs the step it is stuck in, and serves again (the
request completing) as soon as the loop moves."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from engine_svc.engine_loop import STALL_FILE_ENV
from llmserve.v1 import generate_pb2
from tests.e2e.services import health_status, metric_value, scrape, start_engine
from tests.reliability.messages import engine_request, engine_stub

pytestmark = pytest.mark.timeout(180)
STALL_TIMEOUT_S = 1.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def wait_for_status(address: str, status: int, within_s: float) -> float:
    """Seconds until the engine's health is `status` (AssertionError after within_s)."""
    started = time.monotonic()
    while time.monotonic() - started < within_s:
        if health_status(address, timeout=0.5) == status:
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"health not {status} within {within_s} s")


def test_a_wedged_loop_goes_not_serving_and_serves_again_when_it_moves(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.conftest import build_tiny_model

    wedge = tmp_path / "wedge"
    monkeypatch.setenv(STALL_FILE_ENV, str(wedge))
    engine = start_engine(build_tiny_model(tmp_path, seed=4), tmp_path,
                          "--stall-timeout", str(STALL_TIMEOUT_S), "--max-model-len", "256")
    replies: list = []
    try:
        engine.wait_serving()
        wedge.touch()   # the next step blocks after scheduling
        prompt = list(range(3, 40))
        with grpc.insecure_channel(engine.address) as channel:
            call = threading.Thread(target=lambda: replies.extend(engine_stub(channel).Generate(
                engine_request(prompt, max_new_tokens=6, ignore_eos=True), timeout=60)))
            call.start()
            took = wait_for_status(engine.address, NOT_SERVING, STALL_TIMEOUT_S + 4.0)
            assert took >= STALL_TIMEOUT_S - 0.2   # not before the timeout
            log = engine.log_path.read_text()
            assert ("engine loop stalled: no step finished for" in log
                    and f"stuck in a prefill step of batch 1 ({len(prompt)} tokens)" in log), log
            time.sleep(3 * STALL_TIMEOUT_S)   # still wedged: still NOT_SERVING, counted once
            assert health_status(engine.address) == NOT_SERVING
            assert metric_value(scrape(engine.metrics_port), "llmserve_engine_stalls_total") == 1
            wedge.unlink()
            wait_for_status(engine.address, SERVING, 2 * STALL_TIMEOUT_S + 3.0)
            call.join(timeout=60)
        assert not call.is_alive()
        assert len([t for reply in replies for t in reply.token_ids]) == 6
        assert replies[-1].finish_reason == generate_pb2.FINISH_REASON_LENGTH
        assert "engine loop is making progress again" in engine.log_path.read_text()
        assert metric_value(scrape(engine.metrics_port), "llmserve_engine_stalls_total") == 1
    finally:
        if wedge.exists():
            wedge.unlink()
        engine.stop()
