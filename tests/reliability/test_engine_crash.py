"""kill -9 of the engine mid-stream: the client gets UNAVAILABLE fast, the tokenizer service goes
NOT_SERVING, and once an engine is back on the same port requests succeed again without
restarting the tokenizer service."""
from __future__ import annotations

import time

import grpc
import pytest

from tests.reliability.harness import NOT_SERVING, engine_proc, start_stack, wait_pool_idle
from tests.reliability.messages import collect, text_request, text_stub

pytestmark = pytest.mark.timeout(240)

UNAVAILABLE_WITHIN_S = 2.0
PROMPT = "Tell me a long story about a lighthouse."


def test_engine_kill_9_then_restart_on_the_same_port(default_model_dir, log_dir) -> None:
    engine, tokenizer = start_stack(default_model_dir, log_dir)
    restarted = None
    try:
        tokenizer_pid = tokenizer.process.pid
        with tokenizer.channel() as channel:
            stub = text_stub(channel)
            reference = collect(stub.Generate(text_request(PROMPT, 8), timeout=60))
            assert reference.code == grpc.StatusCode.OK

            call = stub.Generate(text_request(PROMPT, 400, ignore_eos=True), timeout=60)
            for _ in range(3):
                next(call)
            engine.kill()
            killed_at = time.monotonic()
            in_flight = collect(call)
            failed_after = time.monotonic() - killed_at
            assert in_flight.code == grpc.StatusCode.UNAVAILABLE, in_flight.details
            assert failed_after < UNAVAILABLE_WITHIN_S

            tokenizer.wait_health(NOT_SERVING, timeout=10)
            refused = collect(stub.Generate(text_request(PROMPT, 8), timeout=10))
            assert refused.code == grpc.StatusCode.UNAVAILABLE, refused.details
            assert "engine" in refused.details

            restarted = engine_proc(default_model_dir, log_dir, port=engine.port).spawn()
            restarted.wait_serving()
            tokenizer.wait_serving(timeout=20)
            again = collect(stub.Generate(text_request(PROMPT, 8), timeout=60))
        assert again.code == grpc.StatusCode.OK, again.details
        assert again.token_ids == reference.token_ids
        assert tokenizer.process.pid == tokenizer_pid and tokenizer.process.poll() is None
        assert not any(wait_pool_idle(restarted).values())
        assert tokenizer.crash_lines() == []
        print(f"\nengine kill -9: stream failed with UNAVAILABLE after {failed_after:.2f} s")
    finally:
        assert tokenizer.stop() == 0
        if restarted is not None:
            restarted.stop()
        engine.stop()
