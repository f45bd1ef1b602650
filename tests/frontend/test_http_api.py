"""The OpenAI HTTP API driven by the official `openai` client, against the fake engine."""
from __future__ import annotations

import asyncio
import json

import openai
import pytest

from llmserve.v1 import generate_pb2
from tests.fakes.fake_engine import ScriptedReply
from tests.frontend.harness import (MAX_MODEL_LEN, REPLY_TEXT, free_port, reply_ids,
                                    running_stack, shared_tokenizer, text_reply, wait_until)

MODEL = "fake-model"  # what the fake engine's GetInfo reports
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "6 times 7?"}]


def client(stack, **options) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stack.http_url + "/v1", api_key=options.pop("key", "x"),
                              max_retries=0, **options)


def http_stack(script=None, **config):
    return running_stack(script, http_port=free_port(), **config)


def test_chat_and_completion_bodies_match_the_grpc_pipeline() -> None:
    async def body() -> None:
        async with http_stack(text_reply(cached_prompt_tokens=5)) as s:
            api = client(s)
            chat = await api.chat.completions.create(
                model=MODEL, messages=CHAT, max_tokens=100, temperature=0, top_p=0.5, seed=11,
                presence_penalty=0.5, frequency_penalty=-0.5, stop=["zzz"], user="u-1",
                extra_body={"top_k": 7, "min_p": 0.1, "repetition_penalty": 1.2,
                            "an_unknown_field": {"is": "ignored"}})
            choice = chat.choices[0]
            assert choice.message.content == REPLY_TEXT and choice.message.role == "assistant"
            assert choice.finish_reason == "stop" and choice.index == 0
            assert chat.id.startswith("chatcmpl-") and chat.object == "chat.completion"
            assert chat.model == MODEL
            sent = s.engine.record.requests[0]
            tokenizer = shared_tokenizer()
            turns = [type("T", (), m)() for m in CHAT]
            assert list(sent.prompt_token_ids) == tokenizer.chat_ids(turns)
            p = sent.sampling
            assert (p.temperature, p.top_k, p.seed, sent.max_new_tokens) == (0.0, 7, 11, 100)
            assert p.top_p == pytest.approx(0.5) and p.min_p == pytest.approx(0.1)
            assert p.repetition_penalty == pytest.approx(1.2)
            assert (p.presence_penalty, p.frequency_penalty) == (0.5, -0.5)
            assert (chat.usage.prompt_tokens, chat.usage.completion_tokens,
                    chat.usage.total_tokens) == (len(sent.prompt_token_ids), len(reply_ids()),
                                                 len(sent.prompt_token_ids) + len(reply_ids()))
            assert chat.usage.prompt_tokens_details.cached_tokens == 5
            text = await api.completions.create(model=MODEL, prompt="Hello there", max_tokens=64)
            assert text.choices[0].text == REPLY_TEXT and text.object == "text_completion"
            assert list(s.engine.record.requests[1].prompt_token_ids) == tokenizer.encode(
                "Hello there")
            assert s.engine.record.requests[1].sampling.temperature == 1.0  # OpenAI's default
    asyncio.run(body())


def test_streaming_chat_sends_role_deltas_finish_and_a_usage_chunk() -> None:
    async def body() -> None:
        async with http_stack(text_reply(cached_prompt_tokens=2)) as s:
            stream = await client(s).chat.completions.create(
                model=MODEL, messages=CHAT, stream=True, stream_options={"include_usage": True})
            chunks = [chunk async for chunk in stream]
            assert chunks[0].choices[0].delta.role == "assistant"
            content = [c for c in chunks if c.choices and c.choices[0].delta.content]
            assert len(content) > 5  # streamed, not buffered
            assert "".join(c.choices[0].delta.content for c in content) == REPLY_TEXT
            finished = [c for c in chunks if c.choices and c.choices[0].finish_reason]
            assert [c.choices[0].finish_reason for c in finished] == ["stop"]
            assert all(c.usage is None for c in chunks[:-1])
            last = chunks[-1]
            assert last.choices == [] and last.usage.completion_tokens == len(reply_ids())
            assert last.usage.prompt_tokens_details.cached_tokens == 2
            assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id
                       for c in chunks)
            plain = await client(s).chat.completions.create(model=MODEL, messages=CHAT,
                                                            stream=True)
            assert all([c.usage is None async for c in plain])  # no include_usage: no usage
    asyncio.run(body())


def test_completions_take_string_list_and_token_id_prompts_and_stream() -> None:
    async def body() -> None:
        async with http_stack() as s:
            api = client(s)
            ids = shared_tokenizer().encode("Token ids in", add_special_tokens=False)
            batch = await api.completions.create(model=MODEL, prompt=["one", "two"], n=2)
            assert [c.index for c in batch.choices] == [0, 1, 2, 3]
            assert all(c.text == REPLY_TEXT for c in batch.choices)
            prompts = {tuple(r.prompt_token_ids) for r in s.engine.record.requests}
            tokenizer = shared_tokenizer()
            assert prompts == {tuple(tokenizer.encode("one")), tuple(tokenizer.encode("two"))}
            assert batch.usage.prompt_tokens == len(tokenizer.encode("one")) + len(
                tokenizer.encode("two"))
            assert batch.usage.completion_tokens == 4 * len(reply_ids())
            await api.completions.create(model=MODEL, prompt=ids, max_tokens=3)
            assert list(s.engine.record.requests[-1].prompt_token_ids) == ids
            stream = await api.completions.create(model=MODEL, prompt="x", stream=True,
                                                  max_tokens=5)
            chunks = [c async for c in stream]
            assert "".join(c.choices[0].text for c in chunks) == tokenizer.decode(
                reply_ids()[:5])
            assert chunks[-1].choices[0].finish_reason == "length"
    asyncio.run(body())


def test_n_choices_have_their_own_index_and_the_prompt_counts_once() -> None:
    async def body() -> None:
        async with http_stack(text_reply(delay_s=0.001)) as s:
            api = client(s)
            reply = await api.chat.completions.create(model=MODEL, messages=CHAT, n=2, seed=5,
                                                      temperature=0.8)
            assert [c.index for c in reply.choices] == [0, 1]
            assert all(c.message.content == REPLY_TEXT for c in reply.choices)
            prompt = len(s.engine.record.requests[0].prompt_token_ids)
            assert reply.usage.prompt_tokens == prompt
            assert reply.usage.completion_tokens == 2 * len(reply_ids())
            # one engine request for both choices: the engine samples choice i with seed + i
            assert [(r.n, r.sampling.seed) for r in s.engine.record.requests] == [(2, 5)]
            stream = await api.chat.completions.create(model=MODEL, messages=CHAT, n=2,
                                                       stream=True)
            texts = {0: "", 1: ""}
            finishes = {}
            async for chunk in stream:
                for choice in chunk.choices:
                    texts[choice.index] += choice.delta.content or ""
                    if choice.finish_reason:
                        finishes[choice.index] = choice.finish_reason
            assert texts == {0: REPLY_TEXT, 1: REPLY_TEXT}
            assert finishes == {0: "stop", 1: "stop"}
    asyncio.run(body())


def test_logprobs_come_in_openai_shapes() -> None:
    async def body() -> None:
        async with http_stack(text_reply(with_logprobs=True)) as s:
            api = client(s)
            chat = await api.chat.completions.create(model=MODEL, messages=CHAT, logprobs=True,
                                                     top_logprobs=2)
            content = chat.choices[0].logprobs.content
            ids = reply_ids()
            tokenizer = shared_tokenizer()
            assert len(content) == len(ids) and s.engine.record.requests[0].top_logprobs == 2
            assert b"".join(bytes(entry.bytes) for entry in content[:-1]) == \
                tokenizer.decode(ids[:-1]).encode()
            assert all(len(entry.top_logprobs) == 2 and entry.logprob == -0.5 for entry in content)
            assert content[0].top_logprobs[0].token == content[0].token
            only_sampled = await api.chat.completions.create(model=MODEL, messages=CHAT,
                                                             logprobs=True)
            assert s.engine.record.requests[1].top_logprobs == 1  # the sampled token's logprob
            assert all(entry.top_logprobs == [] for entry in only_sampled.choices[0].logprobs.content)
            text = await api.completions.create(model=MODEL, prompt="hi", logprobs=1,
                                                max_tokens=4)
            logprobs = text.choices[0].logprobs
            assert logprobs.token_logprobs == [-0.5] * 4 and len(logprobs.top_logprobs) == 4
            assert "".join(logprobs.tokens) == text.choices[0].text
            assert logprobs.text_offset == [0] + [sum(len(t) for t in logprobs.tokens[:i])
                                                  for i in range(1, 4)]
            none = await api.completions.create(model=MODEL, prompt="hi", max_tokens=2)
            assert none.choices[0].logprobs is None
    asyncio.run(body())


@pytest.mark.parametrize("finish, expected", [
    (generate_pb2.FINISH_REASON_EOS, "stop"), (generate_pb2.FINISH_REASON_STOP_TOKEN, "stop"),
    (generate_pb2.FINISH_REASON_LENGTH, "length")])
def test_finish_reasons_map_to_openai(finish: int, expected: str) -> None:
    async def body() -> None:
        async with http_stack(text_reply(finish_reason=finish)) as s:
            reply = await client(s).completions.create(model=MODEL, prompt="x")
            assert reply.choices[0].finish_reason == expected
            cut = await client(s).completions.create(model=MODEL, prompt="x", stop="Done")
            assert cut.choices[0].text == "The answer is 42. "
            assert cut.choices[0].finish_reason == "stop"  # a stop string
    asyncio.run(body())


def test_models_health_tokenize_detokenize_and_request_id() -> None:
    async def body() -> None:
        async with http_stack() as s:
            api = client(s)
            models = await api.models.list()
            assert [m.id for m in models.data] == [MODEL]
            assert models.data[0].model_extra["max_model_len"] == MAX_MODEL_LEN
            http = api._client  # the client's own HTTP session  # noqa: SLF001
            health = await http.get(s.http_url + "/health")
            assert health.status_code == 200
            tokenized = (await http.post(s.http_url + "/tokenize",
                                         json={"prompt": "Hello world"})).json()
            assert tokenized["tokens"] == shared_tokenizer().encode("Hello world")
            assert tokenized["count"] == len(tokenized["tokens"])
            chat = (await http.post(s.http_url + "/tokenize", json={"messages": CHAT})).json()
            assert chat["tokens"] == shared_tokenizer().chat_ids([type("T", (), m)()
                                                                  for m in CHAT])
            text = (await http.post(s.http_url + "/detokenize",
                                    json={"tokens": tokenized["tokens"]})).json()
            assert text == {"prompt": "Hello world"}
            reply = await api.completions.with_raw_response.create(
                model=MODEL, prompt="x", extra_headers={"x-request-id": "my-id-1"})
            assert reply.headers["x-request-id"] == "my-id-1"
            assert reply.parse().id == "cmpl-my-id-1"
            assert s.engine.record.requests[-1].request_id == "my-id-1"
    asyncio.run(body())


def test_frontend_metrics_count_http_requests_under_their_protocol() -> None:
    async def body() -> None:
        async with http_stack() as s:
            await client(s).completions.create(model=MODEL, prompt="x")
            with pytest.raises(openai.BadRequestError):
                await client(s).completions.create(model=MODEL, prompt="x", top_p=3)
            await s.generate(generate_pb2.GenerateRequest(prompt="x"))
            m = s.frontend.metrics
            counts = {(status, protocol): m.requests_total.labels(status, protocol)._value.get()
                      for status in ("ok", "invalid_argument") for protocol in ("grpc", "http")}
            assert counts == {("ok", "grpc"): 1, ("ok", "http"): 1,
                              ("invalid_argument", "grpc"): 0, ("invalid_argument", "http"): 1}
            ttft = m.time_to_first_token_seconds.labels("http")._sum.get()
            assert ttft > 0 and m.inflight_requests.labels("http")._value.get() == 0
    asyncio.run(body())


def test_bench_serve_sends_the_same_load_over_http_and_grpc() -> None:
    from bench.serve import LoadSpec, Prompt, run_load

    async def body() -> None:
        async with http_stack(text_reply(delay_s=0.002)) as s:
            prompts = [Prompt("Hello there", 3), Prompt("Another prompt", 3)]
            results = {}
            for protocol in ("grpc", "http"):
                spec = LoadSpec(2, output_len=8, protocol=protocol, model=MODEL)
                results[protocol], _ = await run_load(f"127.0.0.1:{s.frontend.port}", prompts,
                                                      spec, progress=False,
                                                      http_url=s.http_url)
            for protocol, records in results.items():
                assert [r.error for r in records] == ["", ""], protocol
                assert [r.output_tokens for r in records] == [8, 8], protocol
                assert all(0 < r.ttft_s < r.e2e_s and len(r.itl_s) >= 5 for r in records)
            sent = s.engine.record.requests
            assert len(sent) == 4 and all(r.ignore_eos for r in sent)
            assert {r.max_new_tokens for r in sent} == {8}
    asyncio.run(body())
