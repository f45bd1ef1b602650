"""Structured output on the default model (SmolLM2-135M-Instruct): 8 JSON schemas of different
shapes, greedy and sampled, parse and validate with `jsonschema`; regex and choice outputs match;
a grammar that forces a long output stops (EOS) at its end. One batch for all of it."""
from __future__ import annotations

import json
import re

import pytest

from engine_svc.grammar import ResponseFormat
from engine_svc.params import FinishReason, SamplingParams, StoppingParams
from tests.engine.helpers import make_engine

jsonschema = pytest.importorskip("jsonschema")
pytestmark = pytest.mark.timeout(300)
MAX_NEW_TOKENS = 160

SCHEMAS: dict[str, tuple[str, dict]] = {
    "flat": ("a person with a name and an age", {
        "type": "object", "required": ["name", "age"], "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 120}}}),
    "nested_objects": ("a person and their address (city and 5-digit zip code)", {
        "type": "object", "required": ["name", "address"], "properties": {
            "name": {"type": "string", "maxLength": 20},
            "address": {"type": "object", "required": ["city", "zip"], "properties": {
                "city": {"type": "string", "maxLength": 20},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}}}}),
    "array_of_objects": ("a short todo list", {
        "type": "object", "required": ["todos"], "properties": {"todos": {
            "type": "array", "minItems": 1, "maxItems": 2, "items": {
                "type": "object", "required": ["id", "task", "done"], "properties": {
                    "id": {"type": "integer", "minimum": 1, "maximum": 99},
                    "task": {"type": "string", "maxLength": 16},
                    "done": {"type": "boolean"}}}}}}),
    "enums": ("a t-shirt order", {
        "type": "object", "required": ["color", "size", "quantity"], "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "size": {"type": "string", "enum": ["S", "M", "L", "XL"]},
            "quantity": {"type": "integer", "minimum": 1, "maximum": 5}}}),
    "bounded_numbers": ("a weather reading", {
        "type": "object", "required": ["temperature", "humidity", "wind"], "properties": {
            "temperature": {"type": "number", "minimum": -50, "maximum": 50},
            "humidity": {"type": "integer", "minimum": 0, "maximum": 100},
            "wind": {"type": "number", "minimum": 0, "exclusiveMaximum": 200}}}),
    "required_and_optional": ("a book", {
        "type": "object", "required": ["title"], "additionalProperties": False, "properties": {
            "title": {"type": "string", "maxLength": 30},
            "subtitle": {"type": "string", "maxLength": 30},
            "year": {"type": "integer", "minimum": 1400, "maximum": 2030}}}),
    "top_level_array": ("a list of 2 to 4 fruit names", {
        "type": "array", "minItems": 2, "maxItems": 4,
        "items": {"type": "string", "maxLength": 12}}),
    "nullable_union": ("a measurement that may be missing", {
        "type": "object", "required": ["value", "unit", "valid"], "properties": {
            "value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 1000},
                                {"type": "null"}]},
            "unit": {"type": "string", "enum": ["cm", "kg", "s"]},
            "valid": {"type": "boolean"}}}),
}
REGEX = r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9])"
CHOICES = ("positive", "negative", "neutral")
LONG_GRAMMAR = 'root ::= "Count:" (" " [0-9] [0-9] ","){20} " done."'  # 85+ characters
LONG_TEXT = r"Count:( [0-9]{2},){20} done\."
MODES = {"greedy": SamplingParams(temperature=0.0),
         "sampled": SamplingParams(temperature=1.0, top_p=0.95, seed=7)}


def chat(tokenizer, request: str) -> list[int]:
    text = f"<|im_start|>user\n{request}<|im_end|>\n<|im_start|>assistant\n"
    return tokenizer.encode(text).ids


def requests(tokenizer) -> dict[str, tuple[list[int], ResponseFormat]]:
    """request id -> (prompt, format), without the sampling mode."""
    jobs = {f"schema-{name}": (chat(tokenizer, f"Reply with JSON only: {what}."),
                               ResponseFormat("json_schema", json.dumps(schema)))
            for name, (what, schema) in SCHEMAS.items()}
    jobs["regex"] = (chat(tokenizer, "When did the first person walk on the moon? Date only."),
                     ResponseFormat("regex", REGEX))
    jobs["choice"] = (chat(tokenizer, "Sentiment of: 'I love this phone, it is great!'"),
                      ResponseFormat("choice", choices=CHOICES))
    jobs["long"] = (chat(tokenizer, "Count."), ResponseFormat("grammar", LONG_GRAMMAR))
    return jobs


@pytest.fixture(scope="module")
def results(default_model_dir):
    """Every job in both modes, all in one batch: request id -> (text, tokens, reason)."""
    from dataclasses import replace

    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(default_model_dir / "tokenizer.json"))
    engine = make_engine(default_model_dir, max_num_seqs=32, max_model_len=320, dtype="bfloat16")
    collected: dict[str, list] = {}
    for job, (prompt, fmt) in requests(tokenizer).items():
        for mode, sampling in MODES.items():
            request_id = f"{job}/{mode}"
            collected[request_id] = [[], None]
            engine.add_request(request_id, prompt, replace(sampling, response_format=fmt),
                               StoppingParams(max_new_tokens=MAX_NEW_TOKENS))
    while engine.has_work():
        for out in engine.step():
            collected[out.request_id][0] += out.token_ids
            if out.finished:
                collected[out.request_id][1] = out.finish_reason
    assert engine.rows_held_by_requests() == 0
    return {request_id: (tokenizer.decode(tokens, skip_special_tokens=True), tokens, reason)
            for request_id, (tokens, reason) in collected.items()}


def _ended_at_grammar_end(result: tuple[str, list[int], FinishReason]) -> str:
    text, tokens, reason = result
    assert reason is FinishReason.EOS and tokens[-1] == 2, result  # 2: <|im_end|>, the eos
    return text


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_outputs_parse_and_validate(results, name: str, mode: str) -> None:
    text = _ended_at_grammar_end(results[f"schema-{name}/{mode}"])
    jsonschema.validate(json.loads(text), SCHEMAS[name][1])


@pytest.mark.parametrize("mode", list(MODES))
def test_regex_and_choice_outputs_match(results, mode: str) -> None:
    assert re.fullmatch(REGEX, _ended_at_grammar_end(results[f"regex/{mode}"]))
    assert _ended_at_grammar_end(results[f"choice/{mode}"]) in CHOICES


@pytest.mark.parametrize("mode", list(MODES))
def test_a_long_forced_grammar_stops_at_its_end(results, mode: str) -> None:
    text = _ended_at_grammar_end(results[f"long/{mode}"])
    assert re.fullmatch(LONG_TEXT, text), text
    assert 60 < len(results[f"long/{mode}"][1]) < MAX_NEW_TOKENS  # ended by the grammar
