"""Internal request/response dataclasses of the tokenizer service (no protobuf here).

server.py and engine_client.py convert protobuf messages to and from these at the edge.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import grpc


class FinishReason(str, Enum):
    """Why a generation ended; names match the proto enum without the FINISH_REASON_ prefix."""

    LENGTH = "length"
    EOS = "eos"
    STOP_SEQUENCE = "stop_sequence"
    STOP_TOKEN = "stop_token"
    ABORTED = "aborted"


class ServiceError(Exception):
    """An error that maps to one gRPC status code and a message for the caller."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(slots=True)
class SamplingSettings:
    """Sampling knobs as the client sent them (defaults applied for unset optionals)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None


@dataclass(slots=True)
class ChatTurn:
    """One chat message."""

    role: str
    content: str


@dataclass(slots=True)
class ResponseFormatSpec:
    """A structured-output constraint: kind is json_schema, json_object, regex, grammar or
    choice; value holds the schema, regex, grammar or the choices."""

    kind: str
    value: str | bool | list[str] = ""


@dataclass(slots=True)
class TextRequest:
    """A public Generate request: exactly one of prompt / chat / prompt_token_ids is set."""

    request_id: str
    prompt: str | None = None
    chat: list[ChatTurn] | None = None
    prompt_token_ids: list[int] | None = None  # already tokenized (OpenAI completions)
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    max_new_tokens: int | None = None  # None: server default, capped by the context
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    top_logprobs: int = 0
    n: int = 1
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_tokens: int = 0
    response_format: ResponseFormatSpec | None = None


@dataclass(slots=True)
class EngineLimits:
    """What the engine told us in GetInfo."""

    model: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]
    kv_pool_capacity_tokens: int = 0
    backend: str = ""
    device: str = ""
    dtype: str = ""


@dataclass(slots=True)
class EngineRequest:
    """A request for the engine: token ids in."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingSettings
    max_new_tokens: int
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    top_logprobs: int = 0
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_tokens: int = 0
    response_format: ResponseFormatSpec | None = None
    n: int = 1  # samples of the prompt: one prefill in the engine, chunks carry their index
    num_generated_prompt_tokens: int = 0  # resumed after failover: the prompt's generated tail


@dataclass(slots=True)
class TokenLogprobInfo:
    """Log-probability of one sampled token plus the top alternatives (token_id, logprob)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(slots=True)
class UsageCounts:
    """Token accounting of one request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0


@dataclass(slots=True)
class EngineChunk:
    """One message of the engine's stream: new token ids; the last one has a finish reason."""

    token_ids: list[int]
    logprobs: list[TokenLogprobInfo] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    usage: UsageCounts | None = None
    index: int = 0  # which sample of an n-sample request


@dataclass(slots=True)
class OutputDelta:
    """One message of the public stream: new text and ids of sample `index`; each sample's last
    one has its finish_reason, the stream's last one the usage of the whole request."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobInfo] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    usage: UsageCounts | None = None
    index: int = 0
