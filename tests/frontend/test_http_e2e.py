"""The OpenAI HTTP API of the real services (engine + tokenizer processes, SmolLM2, fp32):
the same greedy text as gRPC, cached prompt tokens, seeded sampling, and a client leaving
mid-SSE frees the engine's KV rows within 1 s."""
from __future__ import annotations

import time

import grpc
import openai
import pytest

from llmserve.v1 import generate_pb2, generate_pb2_grpc
from tests.e2e.services import engine_and_http_front, metric_value, scrape

pytestmark = pytest.mark.timeout(300)
CHAT = [{"role": "user", "content": "Name three colours of the rainbow."}]
LONG_PROMPT = ("The history of the printing press begins in the fifteenth century, when "
               "movable type changed how books were made, sold and read across Europe. ") * 3


@pytest.fixture(scope="module")
def services(default_model_dir, tmp_path_factory):
    with engine_and_http_front(default_model_dir, tmp_path_factory.mktemp("http-e2e")) as running:
        yield running


@pytest.fixture(scope="module")
def api(services) -> openai.OpenAI:
    return openai.OpenAI(base_url=services[2], api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(api) -> str:
    return api.models.list().data[0].id


def grpc_text(address: str, request: generate_pb2.GenerateRequest) -> str:
    with grpc.insecure_channel(address) as channel:
        stub = generate_pb2_grpc.TextGenerationStub(channel)
        return "".join(message.text for message in stub.Generate(request, timeout=120))


def test_greedy_text_over_http_equals_grpc(services, api, model) -> None:
    _, tokenizer, _ = services
    chat = generate_pb2.GenerateRequest(
        sampling=generate_pb2.SamplingParams(temperature=0.0),
        stopping=generate_pb2.StoppingCriteria(max_new_tokens=16))
    for turn in CHAT:
        chat.chat.messages.add(role=turn["role"], content=turn["content"])
    expected = grpc_text(tokenizer.address, chat)
    assert len(expected) > 10
    reply = api.chat.completions.create(model=model, messages=CHAT, temperature=0,
                                        max_tokens=16)
    assert reply.choices[0].message.content == expected
    stream = api.chat.completions.create(model=model, messages=CHAT, temperature=0,
                                         max_tokens=16, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected
    prompt = generate_pb2.GenerateRequest(
        prompt="def fibonacci(n):", sampling=generate_pb2.SamplingParams(temperature=0.0),
        stopping=generate_pb2.StoppingCriteria(max_new_tokens=12))
    completion = api.completions.create(model=model, prompt="def fibonacci(n):", temperature=0,
                                        max_tokens=12)
    assert completion.choices[0].text == grpc_text(tokenizer.address, prompt)


def test_repeated_prompt_reports_cached_tokens(api, model) -> None:
    first = api.completions.create(model=model, prompt=LONG_PROMPT, max_tokens=2, temperature=0)
    again = api.completions.create(model=model, prompt=LONG_PROMPT, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens == again.usage.prompt_tokens > 40
    assert again.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens // 2
    assert again.usage.total_tokens == again.usage.prompt_tokens + 2


def test_seeded_sampling_is_reproducible_and_n_uses_seed_plus_i(api, model) -> None:
    def sample(seed: int, n: int = 1):
        return api.chat.completions.create(model=model, messages=CHAT, temperature=1.0,
                                           seed=seed, max_tokens=16, n=n)

    def texts(reply) -> list[str]:
        return [choice.message.content for choice in reply.choices]

    once = sample(1234)
    assert texts(once) == texts(sample(1234))
    pair = sample(1234, n=2)
    assert texts(pair) == texts(once) + texts(sample(1235))
    assert pair.usage.prompt_tokens == once.usage.prompt_tokens  # the prompt counts once
    assert pair.usage.completion_tokens == 2 * once.usage.completion_tokens == 32


def test_client_leaving_mid_sse_frees_the_kv_pool_within_1s(services, api, model) -> None:
    engine = services[0]

    def used() -> float:
        return metric_value(scrape(engine.metrics_port), "llmserve_kv_pool_used_tokens")

    idle = used()
    stream = api.completions.create(model=model, prompt=LONG_PROMPT, max_tokens=400,
                                    temperature=0, stream=True, extra_body={"ignore_eos": True})
    for index, _ in enumerate(stream):
        if index == 5:
            break
    assert used() > idle  # the request holds rows now
    stream.close()
    left = time.monotonic()
    while used() > idle and time.monotonic() - left < 1.0:
        time.sleep(0.02)
    assert used() == idle, f"KV rows still held {time.monotonic() - left:.2f} s later"
