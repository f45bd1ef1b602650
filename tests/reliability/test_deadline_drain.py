"""Deadlines abort engine work; SIGTERM drains each service (in-flight streams finish, new ones
get UNAVAILABLE) and the process exits 0."""
from __future__ import annotations

import threading
import time

import grpc
import pytest

from llmserve.v1 import generate_pb2
from tests.e2e.services import metric_value, scrape
from tests.reliability.harness import (NOT_SERVING, finished_count, pool_state, start_stack,
                                       tokenizer_proc, wait_pool_idle, wait_until)
from tests.reliability.messages import (Outcome, collect, engine_request, engine_stub,
                                        text_request, text_stub)

pytestmark = pytest.mark.timeout(240)

LONG = 400
DRAIN_TOKENS = 40
IN_FLIGHT = 3


def _deadline_count(tokenizer) -> float:
    text = scrape(tokenizer.metrics_port)
    try:
        return metric_value(
            text, 'llmserve_frontend_requests_total{protocol="grpc",status="deadline_exceeded"}')
    except KeyError:  # the label appears with the first such request
        return 0.0


@pytest.mark.parametrize("entry", ["tokenizer", "engine"])
def test_deadline_aborts_the_engine_request_and_frees_its_kv(stack, entry: str) -> None:
    engine, tokenizer = stack.engine, stack.tokenizer
    aborted_before = finished_count(engine, "aborted")
    busy: list[float] = []
    target = tokenizer if entry == "tokenizer" else engine
    with target.channel() as channel:
        if entry == "tokenizer":
            deadlines_before = _deadline_count(tokenizer)
            call = text_stub(channel).Generate(
                text_request("Tell me a long story.", LONG, ignore_eos=True), timeout=1.5)
        else:
            call = engine_stub(channel).Generate(
                engine_request(max_new_tokens=LONG, ignore_eos=True), timeout=1.5)
        next(call)
        busy.append(pool_state(engine)["kv_pool_used_tokens"])
        outcome = collect(call)
    assert outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert busy[0] > 0  # the request held KV rows while it ran
    state = wait_pool_idle(engine)
    assert not any(state.values()), state
    assert wait_until(lambda: finished_count(engine, "aborted") > aborted_before)
    if entry == "tokenizer":  # the server's side of the deadline may land after the client's
        assert wait_until(lambda: _deadline_count(tokenizer) > deadlines_before)


@pytest.fixture(scope="module")
def drain_stack(default_model_dir, log_dir):
    engine, tokenizer = start_stack(default_model_dir, log_dir)
    try:
        yield engine, tokenizer
    finally:
        tokenizer.stop()
        engine.stop()


def start_in_flight(channel: grpc.Channel, count: int) -> tuple[list[threading.Thread],
                                                                list[Outcome]]:
    """`count` streams that have each received their first message when this returns."""
    outcomes = [Outcome() for _ in range(count)]
    started = threading.Barrier(count + 1, timeout=60)

    def run(index: int) -> None:
        call = text_stub(channel).Generate(
            text_request(f"Count slowly: {index}", DRAIN_TOKENS, ignore_eos=True), timeout=90)
        first = next(call)
        started.wait()
        rest = collect(call)
        rest.token_ids[:0] = list(first.token_ids)
        outcomes[index] = rest

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    started.wait()
    return threads, outcomes


def assert_drained(threads: list[threading.Thread], outcomes: list[Outcome]) -> None:
    for thread in threads:
        thread.join(timeout=90)
    for outcome in outcomes:
        assert outcome.code == grpc.StatusCode.OK, outcome.details
        assert outcome.finish_reason == generate_pb2.FINISH_REASON_LENGTH
        assert len(outcome.token_ids) == DRAIN_TOKENS


def test_sigterm_drains_the_tokenizer_service(drain_stack) -> None:
    _, tokenizer = drain_stack
    with tokenizer.channel() as channel:
        threads, outcomes = start_in_flight(channel, IN_FLIGHT)
        tokenizer.process.terminate()
        time.sleep(0.3)  # the signal is handled; the streams are still running
        assert tokenizer.process.poll() is None
        refused = collect(text_stub(channel).Generate(text_request("Hi", 4), timeout=10))
        assert refused.code == grpc.StatusCode.UNAVAILABLE, refused.details
        assert tokenizer.health() in (NOT_SERVING, None)
        assert_drained(threads, outcomes)
    assert tokenizer.process.wait(timeout=30) == 0
    assert tokenizer.crash_lines() == []


def test_sigterm_drains_the_engine(drain_stack, default_model_dir, log_dir) -> None:
    engine, _ = drain_stack
    tokenizer = tokenizer_proc(default_model_dir, engine.address, log_dir).spawn()
    try:
        tokenizer.wait_serving()
        with tokenizer.channel() as channel, engine.channel() as engine_channel:
            threads, outcomes = start_in_flight(channel, IN_FLIGHT)
            engine.process.terminate()
            time.sleep(0.3)
            assert engine.process.poll() is None
            direct = collect(engine_stub(engine_channel).Generate(engine_request(), timeout=10))
            assert direct.code == grpc.StatusCode.UNAVAILABLE, direct.details
            via_tokenizer = collect(text_stub(channel).Generate(text_request("Hi", 4),
                                                                timeout=10))
            assert via_tokenizer.code == grpc.StatusCode.UNAVAILABLE, via_tokenizer.details
            assert engine.health() == NOT_SERVING
            assert_drained(threads, outcomes)
        assert engine.process.wait(timeout=30) == 0
        tokenizer.wait_health(NOT_SERVING, timeout=10)
        assert engine.crash_lines() == [] and tokenizer.crash_lines() == []
    finally:
        tokenizer.stop()
