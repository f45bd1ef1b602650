"""Request validation of the public API. Every failure is a ValueError naming the field and
its limit (the server turns it into INVALID_ARGUMENT).

The numeric limits mirror engine_svc/params.py (which this package must not import:
tokenizer_svc never pulls in torch); keep the two in sync.
"""
from __future__ import annotations

import json
import math

from tokenizer_svc.schema import ResponseFormatSpec, SamplingSettings, TextRequest

MAX_TEMPERATURE = 100.0
MAX_PENALTY = 2.0
MAX_TOP_LOGPROBS = 20
MAX_STOP_TOKEN_IDS = 64
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_SEED = 2**63
CHAT_ROLES = ("system", "user", "assistant", "tool")
MAX_REQUEST_ID_CHARS = 128
MAX_N = 16
MAX_LOGIT_BIAS_ENTRIES = 300
MAX_LOGIT_BIAS = 100.0
RESPONSE_FORMAT_KINDS = ("json_schema", "json_object", "regex", "grammar", "choice")
MAX_RESPONSE_FORMAT_CHARS = 100_000  # a schema, regex or grammar; all choices together
MAX_CHOICES = 256
# top_k is a uint32 on the wire: any value >= the vocabulary size keeps every token (same as 0).


def _require_finite(name: str, value: float) -> None:
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"sampling.{name} must be a finite number, got {value!r}")


def validate_sampling(sampling: SamplingSettings) -> None:
    """Raise ValueError for the first sampling field that is out of range."""
    for name in ("temperature", "top_p", "min_p", "repetition_penalty",
                 "presence_penalty", "frequency_penalty"):
        _require_finite(name, getattr(sampling, name))
    if not 0.0 <= sampling.temperature <= MAX_TEMPERATURE:
        raise ValueError(f"sampling.temperature must be in [0, {MAX_TEMPERATURE:g}] "
                         f"(0 = greedy), got {sampling.temperature:g}")
    if not 0.0 < sampling.top_p <= 1.0:
        raise ValueError(f"sampling.top_p must be in (0, 1], got {sampling.top_p:g}")
    if sampling.top_k < 0:
        raise ValueError(f"sampling.top_k must be >= 0 (0 = off), got {sampling.top_k}")
    if not 0.0 <= sampling.min_p <= 1.0:
        raise ValueError(f"sampling.min_p must be in [0, 1], got {sampling.min_p:g}")
    if not 0.0 < sampling.repetition_penalty <= MAX_PENALTY:
        raise ValueError(f"sampling.repetition_penalty must be in (0, {MAX_PENALTY:g}], "
                         f"got {sampling.repetition_penalty:g}")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(sampling, name)
        if not -MAX_PENALTY <= value <= MAX_PENALTY:
            raise ValueError(f"sampling.{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], "
                             f"got {value:g}")
    if sampling.seed is not None and not 0 <= sampling.seed < MAX_SEED:
        raise ValueError(f"sampling.seed must be in [0, 2^63), got {sampling.seed}")


def validate_input(request: TextRequest) -> None:
    """The prompt or chat: present, non-empty, known roles."""
    if request.prompt is None and request.chat is None and request.prompt_token_ids is None:
        raise ValueError("input: set either prompt or chat")
    if request.prompt is not None and not request.prompt:
        raise ValueError("prompt must not be empty")
    if request.prompt_token_ids is not None and not request.prompt_token_ids:
        raise ValueError("prompt must hold at least 1 token id, got 0")
    if request.chat is not None:
        if not request.chat:
            raise ValueError("chat.messages must hold at least 1 message, got 0")
        for index, turn in enumerate(request.chat):
            if turn.role not in CHAT_ROLES:
                raise ValueError(f"chat.messages[{index}].role must be one of "
                                 f"{', '.join(CHAT_ROLES)}; got {turn.role!r}")


def validate_stopping(request: TextRequest) -> None:
    """Stop strings, stop token count, top_logprobs and an explicit max_new_tokens >= 1."""
    if request.max_new_tokens is not None and request.max_new_tokens < 1:
        raise ValueError(f"stopping.max_new_tokens must be >= 1, got {request.max_new_tokens}")
    if len(request.stop) > MAX_STOP_STRINGS:
        raise ValueError(f"stopping.stop holds at most {MAX_STOP_STRINGS} strings, "
                         f"got {len(request.stop)}")
    for index, stop in enumerate(request.stop):
        if not stop:
            raise ValueError(f"stopping.stop[{index}] must not be empty")
        if len(stop) > MAX_STOP_STRING_CHARS:
            raise ValueError(f"stopping.stop[{index}] must be at most {MAX_STOP_STRING_CHARS} "
                             f"characters, got {len(stop)}")
    if len(request.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise ValueError(f"stopping.stop_token_ids holds at most {MAX_STOP_TOKEN_IDS} ids, "
                         f"got {len(request.stop_token_ids)}")
    if not 0 <= request.top_logprobs <= MAX_TOP_LOGPROBS:
        raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], "
                         f"got {request.top_logprobs}")


def validate_request_id(request_id: str) -> None:
    """Client-chosen ids are echoed in every response and logged: short and printable only."""
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise ValueError(f"request_id must be at most {MAX_REQUEST_ID_CHARS} characters, "
                         f"got {len(request_id)}")
    if not request_id.isprintable():
        raise ValueError("request_id must hold printable characters only (no control "
                         "characters or line breaks)")


def validate_generation_features(request: TextRequest) -> None:
    """n, logit_bias (values; ids need the vocabulary), min_tokens, response_format."""
    if not 1 <= request.n <= MAX_N:
        raise ValueError(f"n must be in [1, {MAX_N}], got {request.n}")
    if len(request.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
        raise ValueError(f"logit_bias holds at most {MAX_LOGIT_BIAS_ENTRIES} entries, "
                         f"got {len(request.logit_bias)}")
    for token_id, bias in request.logit_bias.items():
        if not (math.isfinite(bias) and -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS):
            raise ValueError(f"logit_bias[{token_id}] must be in [-{MAX_LOGIT_BIAS:g}, "
                             f"{MAX_LOGIT_BIAS:g}], got {bias:g}")
    if request.min_tokens < 0:
        raise ValueError(f"stopping.min_tokens must be >= 0, got {request.min_tokens}")
    if request.max_new_tokens is not None and request.min_tokens > request.max_new_tokens:
        raise ValueError(f"stopping.min_tokens must be <= max_new_tokens "
                         f"({request.max_new_tokens}), got {request.min_tokens}")
    if request.response_format is not None:
        validate_response_format(request.response_format)


def validate_response_format(spec: ResponseFormatSpec) -> None:
    """The shape of a response_format (the engine's grammar compiler checks the rest)."""
    if spec.kind not in RESPONSE_FORMAT_KINDS:
        raise ValueError(f"response_format must be one of {', '.join(RESPONSE_FORMAT_KINDS)}, "
                         f"got {spec.kind!r}")
    field_name = f"response_format.{spec.kind}"
    if spec.kind == "json_object":
        if spec.value is not True:
            raise ValueError("response_format.json_object must be true when set")
        return
    if spec.kind == "choice":
        values = spec.value if isinstance(spec.value, list) else []
        if not 1 <= len(values) <= MAX_CHOICES:
            raise ValueError(f"response_format.choice must hold 1 to {MAX_CHOICES} values, "
                             f"got {len(values)}")
        for index, value in enumerate(values):
            if not value:
                raise ValueError(f"response_format.choice[{index}] must not be empty")
        size = sum(len(value) for value in values)
    else:
        text = spec.value if isinstance(spec.value, str) else ""
        if not text:
            raise ValueError(f"{field_name} must not be empty")
        size = len(text)
    if size > MAX_RESPONSE_FORMAT_CHARS:
        raise ValueError(f"{field_name} must be at most {MAX_RESPONSE_FORMAT_CHARS} characters, "
                         f"got {size}")
    if spec.kind == "json_schema":
        _check_json_schema(str(spec.value))


def _check_json_schema(text: str) -> None:
    try:
        schema = json.loads(text)
    except ValueError as error:
        raise ValueError(f"response_format.json_schema is not valid JSON: {error}") from None
    if not isinstance(schema, (dict, bool)):
        raise ValueError(f"response_format.json_schema must be a JSON object (a schema), "
                         f"got {type(schema).__name__}")


def validate_request(request: TextRequest) -> None:
    """Everything that can be checked before tokenizing; raise ValueError on the first problem."""
    validate_input(request)
    validate_sampling(request.sampling)
    validate_stopping(request)
    validate_generation_features(request)


def validate_vocab_fields(request: TextRequest, vocab_size: int) -> None:
    """Token ids of the request (stop ids, logit_bias keys, a tokenized prompt) < vocab_size."""
    validate_token_ids("stopping.stop_token_ids", request.stop_token_ids, vocab_size)
    for token_id in request.logit_bias:
        if not 0 <= token_id < vocab_size:
            raise ValueError(f"logit_bias keys must be token ids in [0, {vocab_size}), "
                             f"got {token_id}")
    if request.prompt_token_ids is not None:
        validate_token_ids("prompt", request.prompt_token_ids, vocab_size)


def validate_token_ids(field_name: str, token_ids: list[int], vocab_size: int) -> None:
    """Every id must be in [0, vocab_size)."""
    for index, token_id in enumerate(token_ids):
        if not 0 <= token_id < vocab_size:
            raise ValueError(f"{field_name}[{index}] must be in [0, {vocab_size}), got {token_id}")


def resolve_max_new_tokens(requested: int | None, prompt_tokens: int, max_model_len: int,
                           default_max_new_tokens: int) -> int:
    """The generation budget: the request's value, or the default capped by the context room."""
    room = max_model_len - prompt_tokens
    if room < 1:
        raise ValueError(f"prompt is {prompt_tokens} tokens; it must be at most "
                         f"{max_model_len - 1} (max_model_len {max_model_len} minus 1 token "
                         f"to generate)")
    if requested is None:
        return min(default_max_new_tokens, room)
    if requested > room:
        raise ValueError(f"stopping.max_new_tokens must be in [1, {room}] (max_model_len "
                         f"{max_model_len} - {prompt_tokens} prompt tokens), got {requested}")
    return requested


def check_min_tokens(min_tokens: int, max_new_tokens: int) -> None:
    """min_tokens against the resolved generation budget (the request may leave it unset)."""
    if min_tokens > max_new_tokens:
        raise ValueError(f"stopping.min_tokens must be <= max_new_tokens ({max_new_tokens}, "
                         f"the budget left for this prompt), got {min_tokens}")
