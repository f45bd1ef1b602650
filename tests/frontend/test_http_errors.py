"""HTTP error statuses in OpenAI's shape, each followed by a request that still succeeds, and
client disconnects that cancel the engine request (fake engine)."""
from __future__ import annotations

import asyncio

import grpc
import openai
import pytest

from tests.fakes.fake_engine import ScriptedReply
from tests.frontend.harness import (MAX_MODEL_LEN, REPLY_TEXT, reply_ids, wait_until)
from tests.frontend.test_http_api import CHAT, MODEL, client, http_stack


async def still_serving(stack) -> None:
    reply = await client(stack).chat.completions.create(model=MODEL, messages=CHAT)
    assert reply.choices[0].message.content == REPLY_TEXT


BAD_FIELDS = [
    (dict(temperature=-1), "temperature", "temperature must be in [0, 100]"),
    (dict(top_p=0), "top_p", "top_p must be in (0, 1]"),
    (dict(max_tokens=MAX_MODEL_LEN), "max_tokens", "max_tokens must be in [1,"),
    (dict(max_tokens=0), "max_tokens", "max_tokens must be >= 1"),
    (dict(n=17), "n", "n must be in [1, 16], got 17"),
    (dict(seed=-1), "seed", "seed must be in [0, 2^63)"),
    (dict(stop=[""]), "stop[0]", "stop[0] must not be empty"),
    (dict(logit_bias={"5": 101}), "logit_bias[5]", "must be in [-100, 100]"),
    (dict(logit_bias={"10000000": 1}), "logit_bias", "logit_bias keys must be token ids"),
    (dict(logit_bias={"x": 1}), "logit_bias", "logit_bias keys must be token ids, got 'x'"),
    (dict(response_format={"type": "json_schema"}), "response_format.json_schema",
     "response_format.json_schema must be set when response_format.type is json_schema"),
    (dict(response_format={"type": "xml"}), "response_format.type",
     "response_format.type must be text, json_object or json_schema, got 'xml'"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}),
     "response_format.json_schema", "response_format.json_schema must be a JSON object"),
    (dict(logprobs=True, top_logprobs=21), "top_logprobs", "top_logprobs must be in [0, 20]"),
    (dict(top_logprobs=2), "top_logprobs", "top_logprobs needs logprobs: true"),
    (dict(messages=[{"role": "robot", "content": "x"}]), "messages[0].role",
     "messages[0].role must be one of"),
    (dict(messages=[]), "messages", "messages must hold at least 1 message"),
    (dict(messages=[{"role": "user", "content": "word " * 2000}]), "messages",
     f"it must be at most {MAX_MODEL_LEN - 1}"),
    (dict(temperature="hot"), "temperature", "temperature: Input should be a valid number"),
    (dict(extra_body={"min_tokens": 50}, max_tokens=10), "min_tokens",
     "min_tokens must be <= max_tokens (10)"),
]


def test_bad_fields_are_400_naming_the_field_with_the_grpc_limits() -> None:
    async def body() -> None:
        async with http_stack() as s:
            api = client(s)
            for fields, param, message in BAD_FIELDS:
                request = dict(model=MODEL, messages=CHAT) | fields
                with pytest.raises(openai.BadRequestError) as error:
                    await api.chat.completions.create(**request)
                assert error.value.status_code == 400
                assert error.value.body["type"] == "invalid_request_error"
                assert error.value.body["param"] == param, (fields, error.value.body)
                assert message in error.value.body["message"], (fields, error.value.body)
            with pytest.raises(openai.BadRequestError) as error:
                await api.completions.create(model=MODEL, prompt="x", logprobs=21)
            assert error.value.body["param"] == "logprobs"
            for content, expected in ((b"{not json", "not valid JSON"),
                                      (b"[1, 2]", "the body must be a JSON object")):
                raw = await api._client.post(  # noqa: SLF001
                    s.http_url + "/v1/completions", content=content,
                    headers={"content-type": "application/json"})
                assert raw.status_code == 400 and expected in raw.json()["error"]["message"]
            missing = await api._client.post(s.http_url + "/v1/chat/completions",  # noqa: SLF001
                                             json={"model": MODEL})
            assert missing.status_code == 400
            assert missing.json()["error"]["param"] == "messages"
            assert not s.engine.record.requests  # nothing reached the engine
            await still_serving(s)
    asyncio.run(body())


def test_unknown_model_and_route_are_404() -> None:
    async def body() -> None:
        async with http_stack() as s:
            with pytest.raises(openai.NotFoundError) as error:
                await client(s).chat.completions.create(model="gpt-9", messages=CHAT)
            assert error.value.body["code"] == "model_not_found"
            assert "gpt-9" in error.value.body["message"] and MODEL in error.value.body["message"]
            route = await client(s)._client.get(s.http_url + "/v1/nothing")  # noqa: SLF001
            assert route.status_code == 404 and "error" in route.json()
            await still_serving(s)
    asyncio.run(body())


def test_queue_full_is_429_with_retry_after_at_the_front_and_from_the_engine() -> None:
    slow = ScriptedReply(reply_ids(), delay_s=0.03)

    def script(request) -> ScriptedReply:
        if request.request_id == "engine-full":
            return ScriptedReply([], error=grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 error_message="waiting queue is full (--max-queue 0)")
        return slow if request.request_id == "slow" else ScriptedReply(reply_ids())

    async def body() -> None:
        async with http_stack(script, max_concurrent=1) as s:
            api = client(s)
            stream = await api.chat.completions.create(model=MODEL, messages=CHAT, stream=True,
                                                       extra_headers={"x-request-id": "slow"})
            first = await anext(aiter(stream))
            assert first.choices[0].delta.role == "assistant"
            with pytest.raises(openai.RateLimitError) as error:
                await api.chat.completions.create(model=MODEL, messages=CHAT)
            assert error.value.status_code == 429
            assert error.value.response.headers["retry-after"] == "1"
            assert "--max-concurrent" in error.value.body["message"]
            assert "".join([c.choices[0].delta.content or "" async for c in stream
                            if c.choices]) == REPLY_TEXT
            with pytest.raises(openai.RateLimitError) as error:
                await api.completions.create(model=MODEL, prompt="x",
                                             extra_headers={"x-request-id": "engine-full"})
            assert "--max-queue" in error.value.body["message"]
            await still_serving(s)
    asyncio.run(body())


def test_engine_down_is_503_and_health_follows_then_serving_again() -> None:
    async def body() -> None:
        async with http_stack(start_engine=False) as s:
            http = client(s)._client  # noqa: SLF001
            assert (await http.get(s.http_url + "/health")).status_code == 503
            with pytest.raises(openai.InternalServerError) as error:
                await client(s).chat.completions.create(model=MODEL, messages=CHAT)
            assert error.value.status_code == 503
            assert error.value.body["code"] == "engine_unavailable"
            await s.engine_server.start()
            await wait_until(lambda: _status(http, s.http_url + "/health", 200), 8.0,
                             "/health never turned 200 after the engine came up")
            await still_serving(s)
    asyncio.run(body())


async def _status(http, url: str, expected: int) -> bool:
    return (await http.get(url)).status_code == expected


def test_body_too_large_is_413_and_a_duplicate_request_id_is_a_separate_request() -> None:
    async def body() -> None:
        script = lambda request: ScriptedReply(  # noqa: E731
            reply_ids(), delay_s=0.05 if request.request_id == "dup" else 0.0)
        async with http_stack(script, max_message_bytes=4096) as s:
            http = client(s)._client  # noqa: SLF001
            big = await http.post(s.http_url + "/v1/completions",
                                  json={"model": MODEL, "prompt": "x" * 5000})
            assert big.status_code == 413 and "--max-message-bytes" in big.json()["error"]["message"]
            api = client(s)
            stream = await api.completions.create(model=MODEL, prompt="x", stream=True,
                                                  extra_headers={"x-request-id": "dup"})
            await anext(aiter(stream))
            # another client picking the same id neither collides nor learns of the first one
            second = await api.completions.with_raw_response.create(
                model=MODEL, prompt="x", extra_headers={"x-request-id": "dup"})
            assert second.headers["x-request-id"] == "dup"
            assert second.parse().choices[0].text == REPLY_TEXT
            await stream.close()
            sent = s.engine.record.engine_ids
            assert len(sent) == 2 and len(set(sent)) == 2   # unique ids in the engine
            await still_serving(s)
    asyncio.run(body())


def test_disconnect_mid_stream_and_while_waiting_cancel_the_engine_request() -> None:
    slow = lambda request: ScriptedReply(reply_ids() * 20, delay_s=0.05)  # noqa: E731

    async def body() -> None:
        async with http_stack(slow) as s:
            api = client(s)
            stream = await api.chat.completions.create(
                model=MODEL, messages=CHAT, stream=True, extra_headers={"x-request-id": "sse"})
            received = [chunk async for chunk in take(stream, 3)]
            assert len(received) == 3
            await stream.close()
            await wait_until(lambda: "sse" in s.engine.record.cancelled, 1.0,
                             "engine call still running 1 s after the SSE client left")
            with pytest.raises(openai.APITimeoutError):
                await client(s, timeout=0.3).completions.create(
                    model=MODEL, prompt="x", extra_headers={"x-request-id": "json"})
            await wait_until(lambda: "json" in s.engine.record.cancelled, 1.0,
                             "engine call still running 1 s after the client timed out")
            m = s.frontend.metrics
            await wait_until(lambda: m.inflight_requests.labels("http")._value.get() == 0, 2.0,
                             "http inflight gauge stuck")
            assert m.requests_total.labels("cancelled", "http")._value.get() == 2
            assert not s.engine.record.completed
    asyncio.run(body())


async def take(stream, count: int):
    index = 0
    async for chunk in stream:
        yield chunk
        index += 1
        if index == count:
            return
