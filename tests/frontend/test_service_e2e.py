"""The tokenizer service end to end over loopback gRPC, against the fake engine."""
from __future__ import annotations

import asyncio
import math
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from llmserve.v1 import generate_pb2
from tests.fakes.fake_engine import ScriptedReply
from tests.frontend.harness import (MAX_MODEL_LEN, REPLY_TEXT, reply_ids, running_stack,
                                    shared_tokenizer, text_reply, wait_until)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE = "llmserve.v1.TextGeneration"


def text_of(messages) -> str:
    return "".join(m.text for m in messages)


def test_generate_streams_deltas_finish_and_usage() -> None:
    async def body() -> None:
        async with running_stack(text_reply(cached_prompt_tokens=4, with_logprobs=True)) as s:
            request = generate_pb2.GenerateRequest(
                request_id="r-1", prompt="Hello there", top_logprobs=2,
                sampling=generate_pb2.SamplingParams(temperature=0.0, top_k=5, seed=7),
                stopping=generate_pb2.StoppingCriteria(max_new_tokens=100))
            messages = await s.generate(request)
            ids = reply_ids()
            assert text_of(messages) == REPLY_TEXT
            assert [t for m in messages for t in m.token_ids] == ids
            assert len(messages) > 5  # streamed, not buffered
            assert all(m.request_id == "r-1" for m in messages)
            assert all(m.finish_reason == 0 and not m.HasField("usage") for m in messages[:-1])
            last = messages[-1]
            assert last.finish_reason == generate_pb2.FINISH_REASON_EOS
            prompt_ids = shared_tokenizer().encode("Hello there")
            assert (last.usage.prompt_tokens, last.usage.completion_tokens,
                    last.usage.cached_prompt_tokens) == (len(prompt_ids), len(ids), 4)
            assert [lp.token_id for m in messages for lp in m.logprobs] == ids
            assert all(len(lp.top) == 2 for m in messages for lp in m.logprobs)
            sent = s.engine.record.requests[0]
            assert list(sent.prompt_token_ids) == prompt_ids and sent.request_id == "r-1"
            assert sent.sampling.temperature == 0.0 and sent.sampling.top_k == 5
            assert sent.sampling.seed == 7 and sent.sampling.top_p == 1.0
            assert sent.sampling.repetition_penalty == 1.0
            assert sent.max_new_tokens == 100 and sent.top_logprobs == 2
    asyncio.run(body())


def test_chat_is_rendered_with_the_template_and_defaults_apply() -> None:
    async def body() -> None:
        async with running_stack() as s:
            chat = generate_pb2.Chat(messages=[
                generate_pb2.ChatMessage(role="system", content="Be brief."),
                generate_pb2.ChatMessage(role="user", content="What is 6 times 7?")])
            messages = await s.generate(generate_pb2.GenerateRequest(chat=chat))
            assert text_of(messages) == REPLY_TEXT
            assert messages[0].request_id  # server-assigned
            sent = s.engine.record.requests[0]
            tokenizer = shared_tokenizer()
            rendered = tokenizer.decode(list(sent.prompt_token_ids))
            assert rendered == tokenizer.render_chat(
                [type("T", (), {"role": m.role, "content": m.content})() for m in chat.messages])
            assert "Be brief." in rendered and "What is 6 times 7?" in rendered
            assert rendered.rstrip().endswith("assistant")  # the generation prompt
            assert sent.sampling.temperature == 1.0  # unset optional -> documented default
            room = MAX_MODEL_LEN - len(sent.prompt_token_ids)
            assert sent.max_new_tokens == min(256, room)
    asyncio.run(body())


def test_stop_string_cuts_text_and_aborts_the_engine_request() -> None:
    async def body() -> None:
        async with running_stack(text_reply(delay_s=0.01, cached_prompt_tokens=3)) as s:
            request = generate_pb2.GenerateRequest(
                request_id="stop-1", prompt="Q?",
                stopping=generate_pb2.StoppingCriteria(stop=["zzz", "Done"]))
            messages = await s.generate(request)
            assert text_of(messages) == "The answer is 42. "
            last = messages[-1]
            assert last.finish_reason == generate_pb2.FINISH_REASON_STOP_SEQUENCE
            assert s.engine.record.abort_calls == ["stop-1"]
            assert "stop-1" not in s.engine.record.completed
            sent_ids = [t for m in messages for t in m.token_ids]
            assert last.usage.completion_tokens == len(sent_ids) < len(reply_ids())
            assert last.usage.cached_prompt_tokens == 3  # from the engine's ABORTED message
    asyncio.run(body())


def test_client_cancel_and_deadline_cancel_the_engine_call() -> None:
    async def body() -> None:
        slow = lambda request: ScriptedReply(token_ids=reply_ids() * 20, delay_s=0.05)
        async with running_stack(slow) as s:
            call = s.stub.Generate(generate_pb2.GenerateRequest(request_id="c-1", prompt="x"))
            received = 0
            async for _ in call:
                received += 1
                if received == 2:
                    call.cancel()
                    break
            await wait_until(lambda: "c-1" in s.engine.record.cancelled, 5.0,
                             "engine call was not cancelled after the client cancelled")
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await s.generate(generate_pb2.GenerateRequest(request_id="d-1", prompt="x"),
                                 timeout=0.5)
            assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await wait_until(lambda: "d-1" in s.engine.record.cancelled, 5.0,
                             "engine call was not cancelled after the deadline")
            metrics = s.frontend.metrics
            await wait_until(lambda: metrics.inflight_requests.labels("grpc")._value.get() == 0, 5.0,
                             "inflight gauge stuck")
            for status in ("cancelled", "deadline_exceeded"):
                assert metrics.requests_total.labels(status, "grpc")._value.get() == 1, status
    asyncio.run(body())


def _request(**fields) -> generate_pb2.GenerateRequest:
    sampling = fields.pop("sampling", {})
    stopping = fields.pop("stopping", {})
    request = generate_pb2.GenerateRequest(
        sampling=generate_pb2.SamplingParams(**sampling),
        stopping=generate_pb2.StoppingCriteria(**stopping), **fields)
    if "prompt" not in fields and "chat" not in fields:
        request.prompt = "hello"
    return request


INVALID = [
    (dict(prompt=""), "prompt must not be empty"),
    (dict(prompt="word " * 2000), f"it must be at most {MAX_MODEL_LEN - 1}"),  # threaded
    (dict(stopping=dict(max_new_tokens=0)), "stopping.max_new_tokens must be >= 1"),
    (dict(stopping=dict(max_new_tokens=MAX_MODEL_LEN)), "stopping.max_new_tokens must be in [1,"),
    (dict(sampling=dict(temperature=-1.0)), "sampling.temperature must be in [0, 100]"),
    (dict(sampling=dict(temperature=math.nan)), "sampling.temperature must be a finite number"),
    (dict(sampling=dict(top_p=1.5)), "sampling.top_p must be in (0, 1]"),
    (dict(sampling=dict(min_p=2.0)), "sampling.min_p must be in [0, 1]"),
    (dict(sampling=dict(repetition_penalty=3.0)), "sampling.repetition_penalty must be in (0, 2]"),
    (dict(stopping=dict(stop=["a"] * 17)), "stopping.stop holds at most 16 strings"),
    (dict(stopping=dict(stop=[""])), "stopping.stop[0] must not be empty"),
    (dict(stopping=dict(stop=["x" * 300])), "must be at most 256 characters, got 300"),
    (dict(stopping=dict(stop_token_ids=[10**6])), "stopping.stop_token_ids[0] must be in [0,"),
    (dict(chat=generate_pb2.Chat()), "chat.messages must hold at least 1 message"),
    (dict(chat=generate_pb2.Chat(messages=[generate_pb2.ChatMessage(role="robot", content="x")])),
     "chat.messages[0].role must be one of system, user, assistant, tool"),
    (dict(top_logprobs=21), "top_logprobs must be in [0, 20], got 21"),
]


def test_invalid_requests_are_rejected_with_field_and_limit() -> None:
    async def body() -> None:
        async with running_stack() as s:
            for fields, message in INVALID:
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await s.generate(_request(**fields))
                assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, fields
                assert message in error.value.details(), (message, error.value.details())
            with pytest.raises(grpc.aio.AioRpcError) as error:  # no input at all
                await s.generate(generate_pb2.GenerateRequest())
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert s.engine.record.requests == []  # nothing bad reached the engine
            ok = await s.generate(_request())  # and the service still works
            assert ok[-1].finish_reason == generate_pb2.FINISH_REASON_EOS
    asyncio.run(body())


def test_duplicate_request_ids_are_separate_requests_and_engine_errors() -> None:
    def script(request) -> ScriptedReply:
        if request.request_id == "full":
            return ScriptedReply([], error=grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 error_message="waiting queue is full (64)")
        return ScriptedReply(token_ids=reply_ids(), delay_s=0.05)

    async def body() -> None:
        async with running_stack(script) as s:
            first = s.stub.Generate(generate_pb2.GenerateRequest(request_id="dup", prompt="a"))
            await first.read()  # in flight now
            # a second client with the same id: its own request, the id echoed, no collision
            second = await s.generate(generate_pb2.GenerateRequest(request_id="dup", prompt="b"))
            assert text_of(second) == REPLY_TEXT and {m.request_id for m in second} == {"dup"}
            rest = []
            while (message := await first.read()) is not grpc.aio.EOF:
                rest.append(message)
            assert REPLY_TEXT.endswith(text_of(rest)) and rest[-1].request_id == "dup"
            engine_ids = s.engine.record.engine_ids
            assert len(engine_ids) == 2 and len(set(engine_ids)) == 2
            assert all(i.startswith("dup@") for i in engine_ids)
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await s.generate(generate_pb2.GenerateRequest(request_id="full", prompt="c"))
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "waiting queue is full (64)" in error.value.details()
    asyncio.run(body())


def test_engine_down_unavailable_not_serving_then_recovery() -> None:
    async def body() -> None:
        async with running_stack(start_engine=False) as s:
            address = s.engine_server.address
            assert await s.health_status() == NOT_SERVING  # no engine info yet
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await s.generate(_request())
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
            assert f"engine at {address} unavailable" in error.value.details()
            await s.engine_server.start(s.engine_server.port)
            await s.wait_health(SERVING)
            await s.wait_health(SERVING, SERVICE)
            assert text_of(await s.generate(_request())) == REPLY_TEXT

            await s.engine_server.stop()
            await s.wait_health(NOT_SERVING)
            await s.wait_health(NOT_SERVING, SERVICE)
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await s.generate(_request())
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
            assert error.value.details().startswith(f"engine at {address} unavailable: ")

            await s.engine_server.start(s.engine_server.port)  # back on the same port
            await s.wait_health(SERVING)
            assert text_of(await s.generate(_request())) == REPLY_TEXT
    asyncio.run(body())


def test_tokenize_detokenize_and_model_info() -> None:
    async def body() -> None:
        async with running_stack() as s:
            tokenizer = shared_tokenizer()
            text = "Hello world 😀"
            reply = await s.stub.Tokenize(generate_pb2.TokenizeRequest(text=text))
            assert list(reply.token_ids) == tokenizer.encode(text)
            plain = await s.stub.Tokenize(
                generate_pb2.TokenizeRequest(text=text, add_special_tokens=False))
            back = await s.stub.Detokenize(
                generate_pb2.DetokenizeRequest(token_ids=plain.token_ids))
            assert back.text == text
            with_eos = list(plain.token_ids) + tokenizer.eos_token_ids
            skipped = await s.stub.Detokenize(generate_pb2.DetokenizeRequest(
                token_ids=with_eos, skip_special_tokens=True))
            assert skipped.text == text
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await s.stub.Detokenize(generate_pb2.DetokenizeRequest(token_ids=[1, 10**7]))
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"token_ids[1] must be in [0, {tokenizer.vocab_size})" in error.value.details()
            info = await s.stub.GetModelInfo(generate_pb2.GetModelInfoRequest())
            assert (info.model, info.max_context, info.vocab_size) == (
                "fake-model", MAX_MODEL_LEN, tokenizer.vocab_size)
            assert list(info.eos_token_ids) == tokenizer.eos_token_ids
            assert info.has_chat_template
    asyncio.run(body())


def test_health_reflection_and_metrics() -> None:
    async def body() -> None:
        async with running_stack() as s:
            assert await s.health_status("") == SERVING
            assert await s.health_status(SERVICE) == SERVING
            stub = reflection_pb2_grpc.ServerReflectionStub(s.channel)
            call = stub.ServerReflectionInfo()
            await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            reply = await call.read()
            await call.done_writing()
            names = {service.name for service in reply.list_services_response.service}
            assert {SERVICE, "grpc.health.v1.Health"} <= names
            await s.generate(_request())
            with pytest.raises(grpc.aio.AioRpcError):
                await s.generate(_request(prompt=""))
            url = f"http://127.0.0.1:{s.frontend.metrics_port}/metrics"
            body = await asyncio.to_thread(lambda: urllib.request.urlopen(url).read().decode())
            for name in ("llmserve_frontend_requests_total",
                         "llmserve_frontend_request_latency_seconds",
                         "llmserve_frontend_time_to_first_token_seconds",
                         "llmserve_frontend_tokenize_seconds",
                         "llmserve_frontend_inflight_requests"):
                assert name in body, name
            ok = 'llmserve_frontend_requests_total{protocol="grpc",status="ok"} 1.0'
            assert ok in body
            assert ('llmserve_frontend_requests_total{protocol="grpc",status="invalid_argument"} '
                    '1.0') in body
            assert ('llmserve_frontend_time_to_first_token_seconds_count{protocol="grpc"} 1.0'
                    in body)
    asyncio.run(body())
