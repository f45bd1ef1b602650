"""n samples through the real services (engine + tokenizer processes, SmolLM2, fp32): one engine
request whose prompt is prefilled once, sample i equal to a lone request seeded seed + i, the
prompt counted once in the usage, and no KV rows held after."""
from __future__ import annotations

import grpc
import pytest

from llmserve.v1 import generate_pb2, generate_pb2_grpc
from tests.e2e.services import metric_value, scrape, start_engine, start_tokenizer

pytestmark = pytest.mark.timeout(300)
PROMPT = "A short story about a lighthouse keeper who finds a map inside a bottle:"


@pytest.fixture(scope="module")
def services(default_model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("n-samples-e2e")
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
        engine.stop()


def generate(address: str, n: int, seed: int) -> list[generate_pb2.GenerateResponse]:
    request = generate_pb2.GenerateRequest(
        prompt=PROMPT, n=n, sampling=generate_pb2.SamplingParams(temperature=1.0, seed=seed),
        stopping=generate_pb2.StoppingCriteria(max_new_tokens=12, ignore_eos=True))
    with grpc.insecure_channel(address) as channel:
        return list(generate_pb2_grpc.TextGenerationStub(channel).Generate(request, timeout=120))


def texts(messages: list[generate_pb2.GenerateResponse], n: int) -> list[str]:
    return ["".join(m.text for m in messages if m.index == i) for i in range(n)]


def test_n4_prefills_once_and_sample_i_is_seed_plus_i(services) -> None:
    engine, tokenizer = services

    def engine_metric(name: str) -> float:
        return metric_value(scrape(engine.metrics_port), name)

    prefilled = engine_metric("llmserve_prompt_tokens_total")
    messages = generate(tokenizer.address, n=4, seed=77)
    usage = messages[-1].usage
    assert engine_metric("llmserve_prompt_tokens_total") - prefilled == usage.prompt_tokens
    assert (usage.completion_tokens, sum(m.HasField("usage") for m in messages)) == (48, 1)
    finishes = [m for m in messages if m.finish_reason]
    assert sorted(m.index for m in finishes) == [0, 1, 2, 3]
    assert all(m.finish_reason == generate_pb2.FINISH_REASON_LENGTH for m in finishes)
    samples = texts(messages, 4)
    assert samples == texts(generate(tokenizer.address, n=4, seed=77), 4)  # reproducible
    alone = [texts(generate(tokenizer.address, n=1, seed=77 + i), 1)[0] for i in range(4)]
    assert samples == alone
    assert len(set(samples)) > 1
    assert engine_metric("llmserve_kv_pool_used_tokens") == 0
