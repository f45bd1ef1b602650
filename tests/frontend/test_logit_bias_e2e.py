"""logit_bias and min_tokens end to end (real engine + tokenizer service, SmolLM2, fp32).

Marked `engine_generation_features`: the front validates and forwards both fields (issue 20);
these tests pass once the engine applies them (engine_svc: bias added to the logits before
sampling; eos / stop_token_ids masked until min_tokens tokens exist). Until then they fail.
"""
from __future__ import annotations

import grpc
import openai
import pytest

from llmserve.v1 import generate_pb2, generate_pb2_grpc
from tests.e2e.services import engine_and_http_front

pytestmark = [pytest.mark.timeout(300), pytest.mark.engine_generation_features]
SHORT_ANSWER = [{"role": "user", "content": "Is the sky blue? Answer with one word."}]


@pytest.fixture(scope="module")
def services(default_model_dir, tmp_path_factory):
    with engine_and_http_front(default_model_dir, tmp_path_factory.mktemp("logit-bias-e2e")) as (
            _, tokenizer, base_url):
        yield tokenizer.address, openai.OpenAI(base_url=base_url, api_key="unused",
                                               max_retries=0, timeout=120)


def grpc_ids(address: str, request: generate_pb2.GenerateRequest) -> tuple[list[int], object]:
    with grpc.insecure_channel(address) as channel:
        messages = list(generate_pb2_grpc.TextGenerationStub(channel).Generate(request,
                                                                               timeout=120))
    return [t for m in messages for t in m.token_ids], messages[-1]


def tokenize(api: openai.OpenAI, text: str) -> list[int]:
    reply = api._client.post(str(api.base_url).removesuffix("v1/") + "tokenize",  # noqa: SLF001
                             json={"prompt": text, "add_special_tokens": False})
    return reply.json()["tokens"]


def test_plus_100_bias_makes_greedy_pick_that_token(services) -> None:
    address, api = services
    [banana] = tokenize(api, " banana")
    request = generate_pb2.GenerateRequest(
        prompt="The capital of France is", logit_bias={banana: 100.0},
        sampling=generate_pb2.SamplingParams(temperature=0.0),
        stopping=generate_pb2.StoppingCriteria(max_new_tokens=4, ignore_eos=True))
    ids, _ = grpc_ids(address, request)
    assert ids == [banana] * 4
    reply = api.completions.create(model=api.models.list().data[0].id,
                                   prompt="The capital of France is", temperature=0,
                                   max_tokens=3, logit_bias={str(banana): 100})
    assert reply.choices[0].text == " banana" * 3


def test_minus_100_bias_bans_the_greedy_first_token(services) -> None:
    address, _ = services
    plain = generate_pb2.GenerateRequest(
        prompt="The capital of France is", sampling=generate_pb2.SamplingParams(temperature=0),
        stopping=generate_pb2.StoppingCriteria(max_new_tokens=3))
    ids, _ = grpc_ids(address, plain)
    plain.logit_bias[ids[0]] = -100.0
    banned, _ = grpc_ids(address, plain)
    assert ids[0] not in banned


def test_min_tokens_holds_eos_back(services) -> None:
    address, api = services
    request = generate_pb2.GenerateRequest(
        sampling=generate_pb2.SamplingParams(temperature=0.0),
        stopping=generate_pb2.StoppingCriteria(max_new_tokens=40))
    request.chat.messages.add(**SHORT_ANSWER[0])
    ids, last = grpc_ids(address, request)
    assert last.finish_reason == generate_pb2.FINISH_REASON_EOS and len(ids) < 12, ids
    request.stopping.min_tokens = len(ids) + 5
    longer, last = grpc_ids(address, request)
    assert len(longer) >= len(ids) + 5 and last.usage.completion_tokens == len(longer)
    model = api.models.list().data[0].id
    reply = api.chat.completions.create(model=model, messages=SHORT_ANSWER, temperature=0,
                                        max_tokens=40, extra_body={"min_tokens": len(ids) + 5})
    assert reply.usage.completion_tokens >= len(ids) + 5
