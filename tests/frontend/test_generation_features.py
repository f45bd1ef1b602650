"""n samples, logit_bias, min_tokens and response_format through the gRPC API (fake engine)."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from llmserve.v1 import generate_pb2
from tests.fakes.fake_engine import ScriptedReply
from tests.frontend.harness import REPLY_TEXT, reply_ids, running_stack, shared_tokenizer
from tokenizer_svc.generation import merge_streams


def _request(**fields) -> generate_pb2.GenerateRequest:
    request = generate_pb2.GenerateRequest(prompt="Hello there", **fields)
    request.sampling.temperature = 0.7
    return request


def test_n_samples_are_one_engine_request_split_by_index_with_one_usage() -> None:
    def script(request) -> list[ScriptedReply]:  # sample i answers with a different length
        return [ScriptedReply(reply_ids()[:10 + 5 * index], finish_reason=1, delay_s=0.002,
                              cached_prompt_tokens=3) for index in range(request.n)]

    async def body() -> None:
        async with running_stack(script) as s:
            request = _request(request_id="fan", n=3)
            request.sampling.seed = 2**63 - 2
            messages = await s.generate(request)
            [sent] = s.engine.record.requests   # one engine request: the engine forks n samples
            assert (sent.request_id, sent.n, sent.sampling.seed) == ("fan", 3, 2**63 - 2)
            by_index = {i: [m for m in messages if m.index == i] for i in range(3)}
            for index, own in by_index.items():
                ids = [t for m in own for t in m.token_ids]
                assert ids == reply_ids()[:10 + 5 * index]
                assert own[-1].finish_reason == generate_pb2.FINISH_REASON_LENGTH
                assert all(m.finish_reason == 0 for m in own[:-1])
            assert {m.index for m in messages} == {0, 1, 2}
            with_usage = [m for m in messages if m.HasField("usage")]
            assert with_usage == [messages[-1]]
            usage = messages[-1].usage
            prompt = len(shared_tokenizer().encode("Hello there"))
            assert (usage.prompt_tokens, usage.completion_tokens,
                    usage.cached_prompt_tokens) == (prompt, 10 + 15 + 20, 3)
    asyncio.run(body())


def test_a_stop_string_ends_only_its_own_sample() -> None:
    stopped = reply_ids("Stop here: never more words.", eos=False) * 10
    plain = reply_ids("Plain words, one more and then the end.")

    def script(request) -> list[ScriptedReply]:
        return [ScriptedReply(plain, delay_s=0.01), ScriptedReply(stopped, delay_s=0.002),
                ScriptedReply(plain, delay_s=0.01)]

    async def body() -> None:
        async with running_stack(script) as s:
            request = _request(request_id="stops", n=3,
                               stopping=generate_pb2.StoppingCriteria(stop=["never"]))
            messages = await s.generate(request)
            text = {i: "".join(m.text for m in messages if m.index == i) for i in range(3)}
            assert text == {0: "Plain words, one more and then the end.", 1: "Stop here: ",
                            2: "Plain words, one more and then the end."}
            last = {i: [m for m in messages if m.index == i][-1].finish_reason for i in range(3)}
            assert last == {0: generate_pb2.FINISH_REASON_EOS,
                            1: generate_pb2.FINISH_REASON_STOP_SEQUENCE,
                            2: generate_pb2.FINISH_REASON_EOS}
            assert s.engine.record.aborted_samples == [("stops", 1)]  # that sample only
            assert not s.engine.record.cancelled   # the engine call ended on its own
    asyncio.run(body())


def test_n_one_and_unset_behave_alike_and_new_fields_reach_the_engine() -> None:
    async def body() -> None:
        async with running_stack() as s:
            request = _request(request_id="one", n=1, logit_bias={5: 2.5, 7: -100.0})
            request.stopping.min_tokens = 4
            request.stopping.max_new_tokens = 50
            messages = await s.generate(request)
            assert "".join(m.text for m in messages) == REPLY_TEXT
            assert all(m.index == 0 for m in messages)
            sent = s.engine.record.requests[0]
            assert sent.request_id == "one"
            assert dict(sent.logit_bias) == {5: 2.5, 7: -100.0} and sent.min_tokens == 4
            unset = await s.generate(_request(request_id="unset"))
            assert [m.text for m in unset] == [m.text for m in messages]
    asyncio.run(body())


def test_an_engine_error_fails_the_n_request_and_a_client_leaving_cancels_it() -> None:
    def script(request) -> ScriptedReply:
        if request.request_id == "full":
            return ScriptedReply([], error=grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 error_message="queue full")
        return ScriptedReply(reply_ids() * 20, delay_s=0.02)

    async def body() -> None:
        async with running_stack(script) as s:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await s.generate(_request(request_id="full", n=3))
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "queue full" in error.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await s.generate(_request(request_id="slow", n=3), timeout=0.5)
            assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            for _ in range(1000):   # up to 10 s: a loaded CI machine took over 1 s
                if "slow" in s.engine.record.cancelled:
                    break
                await asyncio.sleep(0.01)
            assert s.engine.record.cancelled == ["slow"] and not s.engine.record.completed
    asyncio.run(body())


BAD = [
    (dict(n=17), "n must be in [1, 16]"),
    (dict(logit_bias={i: 1.0 for i in range(301)}), "logit_bias holds at most 300 entries"),
    (dict(logit_bias={3: 100.5}), "logit_bias[3] must be in [-100, 100], got 100.5"),
    (dict(logit_bias={3: float("nan")}), "logit_bias[3] must be in [-100, 100]"),
    (dict(logit_bias={10**7: 1.0}), "logit_bias keys must be token ids in [0,"),
    (dict(stopping=generate_pb2.StoppingCriteria(max_new_tokens=5, min_tokens=6)),
     "stopping.min_tokens must be <= max_new_tokens (5)"),
    (dict(stopping=generate_pb2.StoppingCriteria(min_tokens=10_000)),
     "stopping.min_tokens must be <= max_new_tokens ("),
    (dict(response_format=generate_pb2.ResponseFormat(json_schema="{not json")),
     "response_format.json_schema is not valid JSON"),
    (dict(response_format=generate_pb2.ResponseFormat(json_schema="[1, 2]")),
     "response_format.json_schema must be a JSON object (a schema), got list"),
    (dict(response_format=generate_pb2.ResponseFormat(json_object=False)),
     "response_format.json_object must be true when set"),
    (dict(response_format=generate_pb2.ResponseFormat(regex="")),
     "response_format.regex must not be empty"),
    (dict(response_format=generate_pb2.ResponseFormat(
        choice=generate_pb2.Choices(values=["a", ""]))), "response_format.choice[1] must not be "
     "empty"),
    (dict(response_format=generate_pb2.ResponseFormat(choice=generate_pb2.Choices())),
     "response_format.choice must hold 1 to 256 values, got 0"),
]


def test_new_fields_are_validated_with_invalid_argument_naming_them() -> None:
    async def body() -> None:
        async with running_stack() as s:
            for fields, expected in BAD:
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await s.generate(_request(**fields))
                assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, fields
                assert expected in error.value.details(), (expected, error.value.details())
            assert not s.engine.record.requests  # nothing reached the engine
            assert "".join(m.text for m in await s.generate(_request())) == REPLY_TEXT
    asyncio.run(body())


def test_merge_streams_closes_every_stream_when_the_consumer_stops() -> None:
    closed: list[int] = []

    async def stream(index: int):
        try:
            for item in range(1000):
                await asyncio.sleep(0.001)
                yield item
        finally:
            closed.append(index)

    async def body() -> None:
        merged = merge_streams([stream(0), stream(1)])
        seen = [await anext(merged) for _ in range(6)]
        await merged.aclose()
        assert {index for index, _ in seen} <= {0, 1}
        assert sorted(closed) == [0, 1]
    asyncio.run(body())
