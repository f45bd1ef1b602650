"""response_format through the real services (engine + tokenizer processes, SmolLM2, fp32):
gRPC and the OpenAI HTTP API return output that follows the format; a format the grammar
parser refuses is INVALID_ARGUMENT / HTTP 400 naming the field with the parser's message, and
the Generate request never reaches the engine."""
from __future__ import annotations

import json

import grpc
import openai
import pytest

from llmserve.v1 import generate_pb2, generate_pb2_grpc
from tests.e2e.services import engine_and_http_front, metric_value, scrape

jsonschema = pytest.importorskip("jsonschema")
pytestmark = pytest.mark.timeout(300)
SCHEMA = {"type": "object", "required": ["city", "population"], "properties": {
    "city": {"type": "string", "maxLength": 20},
    "population": {"type": "integer", "minimum": 0, "maximum": 50_000_000}}}
QUESTION = "Give the largest city of France and its population as JSON."
BAD_FORMATS = [  # (format, parser words): compiled by the engine, refused by the parser
    (generate_pb2.ResponseFormat(json_schema='{"type": "objectx"}'), 'Unsupported type "objectx"'),
    (generate_pb2.ResponseFormat(regex="[a-"), "Unclosed '['"),
    (generate_pb2.ResponseFormat(grammar="root ::= foo"), 'Rule "foo" is not defined'),
]


@pytest.fixture(scope="module")
def services(default_model_dir, tmp_path_factory):
    with engine_and_http_front(default_model_dir, tmp_path_factory.mktemp("structured-e2e")) as running:
        yield running


@pytest.fixture(scope="module")
def api(services) -> openai.OpenAI:
    return openai.OpenAI(base_url=services[2], api_key="unused", max_retries=0, timeout=120)


def _request(fmt: generate_pb2.ResponseFormat, **fields) -> generate_pb2.GenerateRequest:
    request = generate_pb2.GenerateRequest(response_format=fmt, **fields)
    request.chat.messages.add(role="user", content=QUESTION)
    request.stopping.max_new_tokens = 64
    return request


def _generate(address: str, request: generate_pb2.GenerateRequest
              ) -> list[generate_pb2.GenerateResponse]:
    with grpc.insecure_channel(address) as channel:
        return list(generate_pb2_grpc.TextGenerationStub(channel).Generate(request, timeout=120))


def test_grpc_json_schema_and_seeded_choice_samples_follow_the_format(services) -> None:
    _, tokenizer, _ = services
    messages = _generate(tokenizer.address, _request(
        generate_pb2.ResponseFormat(json_schema=json.dumps(SCHEMA)),
        sampling=generate_pb2.SamplingParams(temperature=0.0)))
    jsonschema.validate(json.loads("".join(m.text for m in messages)), SCHEMA)
    assert messages[-1].finish_reason == generate_pb2.FINISH_REASON_EOS
    choices = ["Paris", "Lyon", "Marseille"]
    messages = _generate(tokenizer.address, _request(
        generate_pb2.ResponseFormat(choice=generate_pb2.Choices(values=choices)), n=3,
        sampling=generate_pb2.SamplingParams(temperature=1.0, seed=5)))
    texts = {index: "".join(m.text for m in messages if m.index == index) for index in range(3)}
    assert all(text in choices for text in texts.values()), texts


def test_bad_formats_are_invalid_argument_naming_the_field_before_the_engine_sees_them(
        services) -> None:
    engine, tokenizer, _ = services
    before = metric_value(scrape(engine.metrics_port), "llmserve_prompt_tokens_total")
    for fmt, parser_words in BAD_FORMATS:
        with pytest.raises(grpc.RpcError) as error:
            _generate(tokenizer.address, _request(fmt))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        kind = fmt.WhichOneof("kind")
        assert error.value.details().startswith(f"response_format.{kind}: "), error.value.details()
        assert parser_words in error.value.details()
    with pytest.raises(grpc.RpcError) as error:  # not JSON at all: the front alone refuses it
        _generate(tokenizer.address, _request(generate_pb2.ResponseFormat(json_schema="{x")))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "response_format.json_schema is not valid JSON" in error.value.details()
    after = metric_value(scrape(engine.metrics_port), "llmserve_prompt_tokens_total")
    assert after == before  # no Generate reached the engine


def test_http_json_schema_and_json_object_in_openais_shape(api) -> None:
    model = api.models.list().data[0].id
    messages = [{"role": "user", "content": QUESTION}]
    reply = api.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=64,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}})
    jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMA)
    assert reply.choices[0].finish_reason == "stop"
    reply = api.chat.completions.create(
        model=model, temperature=0, max_tokens=64, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": 'Reply with a JSON object whose key "ok" is true.'}])
    assert reply.choices[0].finish_reason == "stop"
    assert json.loads(reply.choices[0].message.content) == {"ok": True}


def test_http_bad_schema_is_400_naming_the_field(api) -> None:
    model = api.models.list().data[0].id
    with pytest.raises(openai.BadRequestError) as error:
        api.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}],
            response_format={"type": "json_schema", "json_schema": {
                "name": "bad", "schema": {"type": "objectx"}}})
    assert error.value.status_code == 400
    assert error.value.body["param"] == "response_format.json_schema"
    assert 'Unsupported type "objectx"' in error.value.body["message"]
