"""Failover over fake engines: a stream whose engine goes away continues on another with the
tokens so far (what the engine is sent, the client's text and usage), n samples continue one by
one, stalled engines lose their streams, a stop string aborts on the current engine, retries
are bounded."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from tests.fakes.fake_engine import ScriptedReply
from tests.frontend.harness import REPLY_TEXT, reply_ids, shared_tokenizer
from tests.frontend.pool_harness import (SERVING, ids_of, pool_stack, request, resuming,
                                         text_of)


def _holder(s) -> int:
    """Index of the engine that received the (first) request."""
    return next(i for i in range(len(s.engines)) if s.sent(i))


async def _read(call, count: int) -> list:
    return [await call.read() for _ in range(count)]


async def _rest(call) -> list:
    messages = []
    while (message := await call.read()) is not grpc.aio.EOF:
        messages.append(message)
    return messages


def test_a_stream_continues_on_another_engine_when_its_engine_goes_away() -> None:
    async def body() -> None:
        async with pool_stack([resuming(delay_s=0.03)] * 2) as s:
            prompt_ids = shared_tokenizer().encode("Hello there")
            call = s.stub.Generate(request(max_new_tokens=100), timeout=20)
            first = await _read(call, 6)
            lost = _holder(s)
            await s.servers[lost].stop()   # gone mid-stream
            messages = first + await _rest(call)
            assert text_of(messages) == REPLY_TEXT   # nothing missing, nothing twice
            assert ids_of(messages) == reply_ids()
            usage = messages[-1].usage
            assert (usage.prompt_tokens, usage.completion_tokens) == (len(prompt_ids),
                                                                      len(reply_ids()))
            [resumed] = s.sent(1 - lost)
            done = resumed.num_generated_prompt_tokens
            assert done >= 6 and list(resumed.prompt_token_ids) == prompt_ids + reply_ids()[:done]
            assert resumed.max_new_tokens == 100 - done
            # its own engine request id (the lost engine may still hold the first one)
            [first_id] = s.engines[lost].record.engine_ids
            assert s.engines[1 - lost].record.engine_ids == [first_id + "~1"]
            assert s.metric("llmserve_frontend_failovers_total",
                            engine=s.addresses[lost]) == 1
            assert s.metric("llmserve_frontend_requests_total", status="ok",
                            protocol="grpc") == 1
    asyncio.run(body())


def test_n_samples_continue_one_by_one_with_their_own_seeds() -> None:
    seed, lengths = 40, [12, 16, 20]
    full = [reply_ids()[:n] for n in lengths]

    def script(request) -> ScriptedReply | list[ScriptedReply]:
        if request.n > 1:
            return [ScriptedReply(ids, delay_s=0.03, finish_reason=3) for ids in full]
        sample = request.sampling.seed - seed   # sample i runs alone with seed + i
        return ScriptedReply(full[sample][request.num_generated_prompt_tokens:], delay_s=0.01)

    async def body() -> None:
        async with pool_stack([script] * 2) as s:
            message = request(max_new_tokens=30, n=3)
            message.sampling.temperature, message.sampling.seed = 1.0, seed
            call = s.stub.Generate(message, timeout=20)
            first = await _read(call, 7)
            lost = _holder(s)
            await s.servers[lost].stop()
            messages = first + await _rest(call)
            for index in range(3):
                own = [m for m in messages if m.index == index]
                assert ids_of(own) == full[index], index
            resumed = s.sent(1 - lost)
            assert sorted(r.sampling.seed for r in resumed) == [seed, seed + 1, seed + 2]
            assert all(r.n in (0, 1) for r in resumed)
            assert messages[-1].usage.completion_tokens == sum(lengths)
    asyncio.run(body())


def test_streams_of_a_stalled_engine_move_and_a_draining_one_keeps_its_own() -> None:
    async def body() -> None:
        stalled = lambda request: ScriptedReply(reply_ids(), delay_s=30.0)  # noqa: E731
        async with pool_stack([stalled, resuming()], engine_stall_timeout_s=0.3) as s:
            await s.servers[1].set_serving(False)   # so the request lands on the stalling one
            await s.wait_usable(1, False)
            call = s.stub.Generate(request(), timeout=20)
            await asyncio.sleep(0.2)
            assert len(s.sent(0)) == 1
            await s.servers[1].set_serving(True)
            await s.servers[0].set_serving(False)   # reports it: after 0.3 s of nothing, moved
            assert text_of(await _rest(call)) == REPLY_TEXT
            assert len(s.sent(1)) == 1 and s.engines[0].record.cancelled
        async with pool_stack([resuming(delay_s=0.05)] * 2, engine_stall_timeout_s=0.3) as s:
            call = s.stub.Generate(request(), timeout=20)
            first = await _read(call, 2)
            holder = _holder(s)
            await s.servers[holder].set_serving(False)   # draining: still streaming
            assert text_of(first + await _rest(call)) == REPLY_TEXT
            assert not s.sent(1 - holder)
    asyncio.run(body())


def test_a_stop_string_after_a_failover_aborts_on_the_current_engine() -> None:
    async def body() -> None:
        async with pool_stack([resuming(delay_s=0.03)] * 2) as s:
            message = request(max_new_tokens=100)
            message.stopping.stop.append("few more")
            call = s.stub.Generate(message, timeout=20)
            first = await _read(call, 3)
            lost = _holder(s)
            await s.servers[lost].stop()
            messages = first + await _rest(call)
            assert text_of(messages) == REPLY_TEXT[:REPLY_TEXT.index("few more")]
            assert s.engines[1 - lost].record.abort_calls == [s.sent(lost)[0].request_id]
            assert messages[-1].finish_reason == 3   # STOP_SEQUENCE
    asyncio.run(body())


@pytest.mark.parametrize("retries", [0, 2])
def test_retries_are_bounded(retries: int) -> None:
    down = lambda request: ScriptedReply([], error=grpc.StatusCode.UNAVAILABLE,  # noqa: E731
                                         error_message="engine is shutting down")

    async def body() -> None:
        async with pool_stack([down] * 4, max_engine_retries=retries) as s:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await s.generate(request())
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
            assert f"gave up after {retries} engine retries" in error.value.details()
            assert sum(len(s.sent(i)) for i in range(4)) == retries + 1   # each engine once
            assert max(len(s.sent(i)) for i in range(4)) == 1
    asyncio.run(body())


def test_a_full_queue_sends_the_request_to_another_engine() -> None:
    full = lambda request: ScriptedReply([], error=grpc.StatusCode.RESOURCE_EXHAUSTED,  # noqa: E731
                                         error_message="waiting queue is full (4)")

    async def body() -> None:
        async with pool_stack([full, resuming()], routing="round-robin") as s:
            for _ in range(2):
                assert text_of(await s.generate(request())) == REPLY_TEXT
        async with pool_stack([full]) as s:   # nowhere else: the engine's own error
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await s.generate(request())
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert await s.health() == SERVING
    asyncio.run(body())
