"""Both services as real processes on loopback: text, concurrency, cancel, health, metrics."""
from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.e2e.services import metric_value, scrape, start_engine, start_tokenizer

pytestmark = pytest.mark.timeout(600)

ENGINE_METRICS = [
    "llmserve_kv_pool_capacity_tokens", "llmserve_kv_pool_used_tokens",
    "llmserve_kv_pool_usage_ratio", "llmserve_kv_pool_shared_tokens",
    "llmserve_requests_running", "llmserve_requests_waiting", "llmserve_prompt_tokens_total",
    "llmserve_generation_tokens_total", "llmserve_prefix_cache_queried_tokens_total",
    "llmserve_prefix_cache_hit_tokens_total", "llmserve_preemptions_total",
    "llmserve_requests_finished_total", "llmserve_time_to_first_token_seconds_bucket",
    "llmserve_inter_token_latency_seconds_bucket", "llmserve_e2e_request_latency_seconds_bucket",
    "llmserve_batch_size_bucket", "llmserve_step_duration_seconds_bucket",
    "llmserve_device_memory_bytes",
]
FRONTEND_METRICS = [
    "llmserve_frontend_requests_total", "llmserve_frontend_request_latency_seconds_bucket",
    "llmserve_frontend_time_to_first_token_seconds_bucket",
    "llmserve_frontend_tokenize_seconds_bucket", "llmserve_frontend_inflight_requests",
]
PROMPTS = ["The capital of France is", "Write a list of three fruits:", "def add(a, b):",
           "The quick brown fox"]


@pytest.fixture(scope="module")
def stack(default_model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    engine = start_engine(default_model_dir, logs)
    tokenizer = None
    try:
        engine.wait_serving()
        tokenizer = start_tokenizer(default_model_dir, engine.address, logs)
        tokenizer.wait_serving()
        yield engine, tokenizer
    finally:
        if tokenizer is not None:
            tokenizer.stop()
        assert engine.stop() == 0, engine.log_path.read_text()[-2000:]


def stub(address: str):
    from llmserve.v1 import generate_pb2_grpc

    return generate_pb2_grpc.TextGenerationStub(grpc.insecure_channel(address))


def greedy_request(prompt: str | None = None, max_new_tokens: int = 24, chat=None, **stopping):
    from llmserve.v1 import generate_pb2

    request = generate_pb2.GenerateRequest(
        sampling=generate_pb2.SamplingParams(temperature=0.0),
        stopping=generate_pb2.StoppingCriteria(max_new_tokens=max_new_tokens, **stopping))
    if chat is not None:
        for role, content in chat:
            request.chat.messages.add(role=role, content=content)
    else:
        request.prompt = prompt
    return request


def collect(responses) -> tuple[str, list[int], object]:
    text, ids, last = "", [], None
    for response in responses:
        text += response.text
        ids.extend(response.token_ids)
        last = response
    return text, ids, last


def test_health_went_from_not_serving_to_serving(stack):
    engine, tokenizer = stack
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    assert engine.statuses[-1] == serving and tokenizer.statuses[-1] == serving
    assert not_serving in engine.statuses  # the engine answers health while it warms up


def test_greedy_text_matches_in_process_engine(stack, default_model_dir):
    from transformers import AutoTokenizer

    from engine_svc.params import SamplingParams, StoppingParams
    from tests.engine.helpers import make_engine

    _, tokenizer_svc = stack
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    engine = make_engine(default_model_dir, max_model_len=1024)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    expected = engine.generate(prompts, SamplingParams(temperature=0.0),
                               StoppingParams(max_new_tokens=24))
    client = stub(tokenizer_svc.address)
    for prompt_text, prompt_ids, want in zip(PROMPTS, prompts, expected):
        text, ids, last = collect(client.Generate(greedy_request(prompt_text)))
        assert ids == want
        assert text == tokenizer.decode(want, skip_special_tokens=True)
        assert last.usage.prompt_tokens == len(prompt_ids)
        assert last.usage.completion_tokens == len(want)
        assert last.finish_reason != 0


def test_chat_input_uses_the_template(stack, default_model_dir):
    from transformers import AutoTokenizer

    _, tokenizer_svc = stack
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    chat = [("system", "You are terse."), ("user", "Name a color.")]
    rendered = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in chat],
                                             tokenize=False, add_generation_prompt=True)
    expected_prompt = len(tokenizer.encode(rendered, add_special_tokens=False))
    text, ids, last = collect(stub(tokenizer_svc.address).Generate(greedy_request(chat=chat)))
    assert last.usage.prompt_tokens == expected_prompt
    assert ids and text.strip()


def test_sixteen_concurrent_streams_arrive_incrementally(stack):
    _, tokenizer_svc = stack
    client = stub(tokenizer_svc.address)
    results: dict[int, tuple] = {}

    def run(index: int) -> None:
        arrivals, ids = [], []
        for response in client.Generate(greedy_request(PROMPTS[index % 4], max_new_tokens=32,
                                                       ignore_eos=True)):
            arrivals.append(time.monotonic())
            ids.extend(response.token_ids)
        results[index] = (arrivals, ids)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert len(results) == 16
    for index, (arrivals, ids) in results.items():
        assert ids == results[index % 4][1]          # same prompt, same greedy tokens
        assert len(ids) == 32
        assert len(arrivals) >= 8                      # streamed in many messages
        assert arrivals[0] < arrivals[-1] - 0.05       # first delta well before the last


def test_cancel_mid_stream_frees_kv_within_a_second(stack):
    engine, tokenizer_svc = stack
    idle = metric_value(scrape(engine.metrics_port), "llmserve_kv_pool_used_tokens")
    call = stub(tokenizer_svc.address).Generate(
        greedy_request("Tell me a long story about a dragon.", max_new_tokens=400,
                       ignore_eos=True))
    for count, _ in enumerate(call):
        if count == 5:
            break
    busy = metric_value(scrape(engine.metrics_port), "llmserve_kv_pool_used_tokens")
    assert busy > idle
    call.cancel()
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        used = metric_value(scrape(engine.metrics_port), "llmserve_kv_pool_used_tokens")
        if used == idle:
            break
        time.sleep(0.05)
    assert used == idle
    text, ids, _ = collect(stub(tokenizer_svc.address).Generate(greedy_request("Hello")))
    assert ids  # still serving


def test_reflection_lists_both_services(stack):
    engine, tokenizer_svc = stack
    for address, service in ((engine.address, "llmserve.v1.Engine"),
                             (tokenizer_svc.address, "llmserve.v1.TextGeneration")):
        with grpc.insecure_channel(address) as channel:
            replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            names = {s.name for s in next(replies).list_services_response.service}
        assert service in names and "grpc.health.v1.Health" in names


def test_every_metric_is_exported_and_counters_grow(stack):
    engine, tokenizer_svc = stack
    before_engine, before_front = scrape(engine.metrics_port), scrape(tokenizer_svc.metrics_port)
    for name in ENGINE_METRICS:
        metric_value(before_engine, name)
    for name in FRONTEND_METRICS:
        metric_value(before_front, name)
    collect(stub(tokenizer_svc.address).Generate(greedy_request("Count to five:", 8,
                                                                ignore_eos=True)))
    after_engine, after_front = scrape(engine.metrics_port), scrape(tokenizer_svc.metrics_port)
    for name in ("llmserve_generation_tokens_total", "llmserve_prompt_tokens_total",
                 "llmserve_requests_finished_total", "llmserve_prefix_cache_queried_tokens_total",
                 "llmserve_time_to_first_token_seconds_count", "llmserve_batch_size_count"):
        assert metric_value(after_engine, name) > metric_value(before_engine, name), name
    assert (metric_value(after_front, "llmserve_frontend_requests_total")
            > metric_value(before_front, "llmserve_frontend_requests_total"))
    assert metric_value(after_engine, "llmserve_kv_pool_capacity_tokens") == 8192


def engine_messages(address: str, prompt_ids: list[int], max_new_tokens: int,
                    top_logprobs: int = 0) -> list:
    from llmserve.v1 import engine_pb2, engine_pb2_grpc, generate_pb2

    request = engine_pb2.EngineGenerateRequest(
        prompt_token_ids=prompt_ids, sampling=generate_pb2.SamplingParams(temperature=0.0),
        max_new_tokens=max_new_tokens, ignore_eos=True, top_logprobs=top_logprobs)
    with grpc.insecure_channel(address) as channel:
        return list(engine_pb2_grpc.EngineStub(channel).Generate(request, timeout=120))


def test_stream_interval_sends_tokens_in_threes_with_the_same_ids_and_text(
        stack, default_model_dir, tmp_path):
    from llmserve.v1 import generate_pb2

    default_engine, default_tokenizer = stack
    prompt = "The capital of France is"
    prompt_ids = list(stub(default_tokenizer.address).Tokenize(
        generate_pb2.TokenizeRequest(text=prompt)).token_ids)
    one_by_one = engine_messages(default_engine.address, prompt_ids, 8, top_logprobs=2)
    text_one_by_one = collect(stub(default_tokenizer.address).Generate(
        greedy_request(prompt, max_new_tokens=8, ignore_eos=True)))[0]
    engine = start_engine(default_model_dir, tmp_path, "--stream-interval", "3")
    tokenizer = None
    try:
        engine.wait_serving()
        grouped = engine_messages(engine.address, prompt_ids, 8, top_logprobs=2)
        tokenizer = start_tokenizer(default_model_dir, engine.address, tmp_path)
        tokenizer.wait_serving()
        deltas = list(stub(tokenizer.address).Generate(
            greedy_request(prompt, max_new_tokens=8, ignore_eos=True)))
    finally:
        if tokenizer is not None:
            tokenizer.stop()
        assert engine.stop() == 0, engine.log_path.read_text()[-2000:]
    assert [len(m.token_ids) for m in one_by_one] == [1] * 8
    assert [len(m.token_ids) for m in grouped] == [1, 3, 3, 1]   # first at once, the rest in 3s
    assert [t for m in grouped for t in m.token_ids] == [t for m in one_by_one for t in m.token_ids]
    assert ([(lp.token_id, lp.top[1].token_id) for m in grouped for lp in m.logprobs]
            == [(lp.token_id, lp.top[1].token_id) for m in one_by_one for lp in m.logprobs])
    assert grouped[-1].finish_reason == one_by_one[-1].finish_reason != 0
    assert grouped[-1].usage.completion_tokens == 8
    assert not any(m.HasField("usage") for m in grouped[:-1])
    assert [len(d.token_ids) for d in deltas] == [1, 3, 3, 1]   # the tokenizer keeps the groups
    assert "".join(d.text for d in deltas) == text_one_by_one


def test_stream_interval_below_one_is_refused_before_loading(default_model_dir, tmp_path):
    engine = start_engine(default_model_dir, tmp_path, "--stream-interval", "0")
    assert engine.process.wait(timeout=60) == 2
    assert "--stream-interval must be >= 1, got 0" in engine.log_path.read_text()
