"""OpenAI request bodies (pydantic) of the HTTP edge and their translation to TextRequest.

Part of the HTTP edge with http_api.py (routes, errors, server) and http_render.py (response
shapes): field names, defaults and units are OpenAI's here and the service's internal ones in
schema.py. Unknown fields are ignored, as OpenAI does; the vLLM-style extras (top_k, min_p,
repetition_penalty, ignore_eos, min_tokens, stop_token_ids) are accepted too.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict

from tokenizer_svc.schema import ChatTurn, ResponseFormatSpec, SamplingSettings, TextRequest

ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    """stream_options: include_usage adds a last chunk with the usage."""

    include_usage: bool = False


class ContentPart(_Body):
    """One part of a message's content; only text parts are supported."""

    type: str
    text: str | None = None


class ChatMessageBody(_Body):
    """A chat message as OpenAI sends it (content may be a list of text parts)."""

    role: str
    content: str | list[ContentPart] | None = None


class ResponseFormatBody(_Body):
    """response_format: {"type": "text" | "json_object" | "json_schema", "json_schema": {...}}."""

    type: str
    json_schema: dict | None = None


class GenerationBody(_Body):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int | None = None
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormatBody | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted, not used
    ignore_eos: bool = False
    min_tokens: int = 0

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionBody(GenerationBody):
    """POST /v1/chat/completions."""

    messages: list[ChatMessageBody]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None


class CompletionBody(GenerationBody):
    """POST /v1/completions: prompt is a string, a list of strings, token ids or lists of ids."""

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None


class TokenizeBody(_Body):
    """POST /tokenize: a prompt, or chat messages rendered with the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessageBody] | None = None
    add_special_tokens: bool | None = None


class DetokenizeBody(_Body):
    """POST /detokenize."""

    model: str | None = None
    tokens: list[int]
    skip_special_tokens: bool = False


@dataclass(slots=True)
class LogprobRequest:
    """What the client asked for: logprobs at all, and how many alternatives per token."""

    wanted: bool = False
    top: int = 0

    @property
    def engine_top(self) -> int:
        """Alternatives to ask the engine for: at least 1, so it reports the sampled token's."""
        return max(1, self.top) if self.wanted else 0


def chat_turns(messages: list[ChatMessageBody]) -> list[ChatTurn]:
    """OpenAI messages -> chat turns (text parts joined; developer counts as system)."""
    turns = []
    for index, message in enumerate(messages):
        if isinstance(message.content, list):
            for part_index, part in enumerate(message.content):
                if part.type != "text" or part.text is None:
                    raise ValueError(f"messages[{index}].content[{part_index}]: only text "
                                     f"parts are supported, got type {part.type!r}")
            content = "".join(part.text or "" for part in message.content)
        else:
            content = message.content or ""
        turns.append(ChatTurn(ROLE_ALIASES.get(message.role, message.role), content))
    return turns


def _logit_bias(body: GenerationBody) -> dict[int, float]:
    bias: dict[int, float] = {}
    for key, value in (body.logit_bias or {}).items():
        try:
            bias[int(key)] = value
        except ValueError:
            raise ValueError(f"logit_bias keys must be token ids, got {key!r}") from None
    return bias


def _response_format(body: GenerationBody) -> ResponseFormatSpec | None:
    spec = body.response_format
    if spec is None or spec.type == "text":
        return None
    if spec.type not in ("json_object", "json_schema"):
        raise ValueError(f"response_format.type must be text, json_object or json_schema, "
                         f"got {spec.type!r}")
    if spec.type == "json_object":
        return ResponseFormatSpec("json_object", True)
    # OpenAI's shape: {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}
    if spec.json_schema is None:
        raise ValueError("response_format.json_schema must be set when response_format.type is "
                         "json_schema")
    schema = spec.json_schema.get("schema")
    if schema is None:  # a named format without a schema: any JSON object
        return ResponseFormatSpec("json_object", True)
    return ResponseFormatSpec("json_schema", json.dumps(schema))


def _text_request(body: GenerationBody, request_id: str, max_tokens: int | None,
                  logprobs: LogprobRequest) -> TextRequest:
    """The fields both endpoints share; the caller sets prompt / chat / prompt_token_ids."""
    sampling = SamplingSettings(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=0 if body.top_k in (None, -1) else body.top_k,  # vLLM's -1 = off
        min_p=body.min_p or 0.0,
        repetition_penalty=(1.0 if body.repetition_penalty is None
                            else body.repetition_penalty),
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0, seed=body.seed)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return TextRequest(
        request_id=request_id, sampling=sampling, max_new_tokens=max_tokens, stop=stop,
        stop_token_ids=list(body.stop_token_ids or []), ignore_eos=body.ignore_eos,
        top_logprobs=logprobs.engine_top, n=1 if body.n is None else body.n,
        logit_bias=_logit_bias(body), min_tokens=body.min_tokens,
        response_format=_response_format(body))


def chat_request(body: ChatCompletionBody, request_id: str) -> tuple[TextRequest, LogprobRequest]:
    """/v1/chat/completions body -> TextRequest; ValueError names a bad field."""
    if body.top_logprobs is not None and not body.logprobs:
        raise ValueError("top_logprobs needs logprobs: true")
    logprobs = LogprobRequest(bool(body.logprobs), body.top_logprobs or 0)
    max_tokens = (body.max_completion_tokens if body.max_completion_tokens is not None
                  else body.max_tokens)
    request = _text_request(body, request_id, max_tokens, logprobs)
    request.chat = chat_turns(body.messages)
    return request, logprobs


def completion_requests(body: CompletionBody, request_id: str
                        ) -> tuple[list[TextRequest], LogprobRequest]:
    """/v1/completions body -> one TextRequest per prompt; ValueError names a bad field."""
    if body.echo:
        raise ValueError("echo is not supported")
    if body.suffix:
        raise ValueError("suffix is not supported")
    if body.best_of is not None and body.best_of != (body.n or 1):
        raise ValueError("best_of is not supported (it must equal n)")
    logprobs = LogprobRequest(body.logprobs is not None, body.logprobs or 0)
    prompts: list[str | list[int]]
    if isinstance(body.prompt, str):
        prompts = [body.prompt]
    elif body.prompt and all(isinstance(item, int) for item in body.prompt):
        prompts = [list(body.prompt)]  # type: ignore[arg-type]
    else:
        prompts = list(body.prompt)  # type: ignore[arg-type]
    if not prompts:
        raise ValueError("prompt must hold at least 1 prompt")
    requests = []
    for index, prompt in enumerate(prompts):
        request = _text_request(body, request_id if len(prompts) == 1
                                else f"{request_id}-{index}", body.max_tokens, logprobs)
        if isinstance(prompt, str):
            request.prompt = prompt
        else:
            request.prompt_token_ids = list(prompt)
        requests.append(request)
    return requests, logprobs
