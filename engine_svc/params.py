"""Request parameters as plain dataclasses (no protobuf inside the engine).

Each `validate()` raises `ValueError` with a message that names the field and its limit;
the gRPC layer turns that into INVALID_ARGUMENT.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine_svc.grammar import ResponseFormat

MAX_TOP_LOGPROBS = 20
MAX_STOP_TOKEN_IDS = 64
MAX_PENALTY = 2.0
MAX_LOGIT_BIAS_ENTRIES = 300
MAX_LOGIT_BIAS = 100.0
MAX_SAMPLES = 16          # n: samples of one prompt
MAX_SEED = 2**63


class FinishReason(str, Enum):
    """Why a request stopped; names match the gRPC `FinishReason` enum."""

    LENGTH = "length"
    EOS = "eos"
    STOP_SEQUENCE = "stop_sequence"
    STOP_TOKEN = "stop_token"
    ABORTED = "aborted"


def _check_finite(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or math.isnan(value) or math.isinf(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


@dataclass(slots=True)
class SamplingParams:
    """How the next token is chosen. temperature 0 means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    top_logprobs: int = 0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    response_format: ResponseFormat | None = None  # structured output (engine_svc/grammar.py)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ValueError naming the first field that is out of range (logit_bias keys are
        checked against vocab_size when it is given)."""
        for name in ("temperature", "top_p", "min_p", "repetition_penalty",
                     "presence_penalty", "frequency_penalty"):
            _check_finite(name, getattr(self, name))
        if self.temperature < 0.0 or self.temperature > 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0.0 < self.repetition_penalty <= MAX_PENALTY:
            raise ValueError(
                f"repetition_penalty must be in (0, {MAX_PENALTY}], got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -MAX_PENALTY <= value <= MAX_PENALTY:
                raise ValueError(f"{name} must be in [-{MAX_PENALTY}, {MAX_PENALTY}], got {value}")
        if self.seed is not None and not 0 <= self.seed < MAX_SEED:
            raise ValueError(f"seed must be in [0, 2^63), got {self.seed}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(
                f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        _validate_logit_bias(self.logit_bias, vocab_size)


def _validate_logit_bias(bias: dict[int, float], vocab_size: int | None) -> None:
    if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
        raise ValueError(f"logit_bias holds at most {MAX_LOGIT_BIAS_ENTRIES} entries, "
                         f"got {len(bias)}")
    limit = vocab_size if vocab_size is not None else 2**32
    for token_id, value in bias.items():
        if isinstance(token_id, bool) or not isinstance(token_id, int) \
                or not 0 <= token_id < limit:
            raise ValueError(f"logit_bias keys must be token ids in [0, {limit}), "
                             f"got {token_id!r}")
        if not isinstance(value, (int, float)) or math.isnan(value) \
                or not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias[{token_id}] must be in [-{MAX_LOGIT_BIAS:g}, "
                             f"{MAX_LOGIT_BIAS:g}], got {value!r}")


@dataclass(slots=True)
class StoppingParams:
    """When a request ends (token-level; stop strings live in the tokenizer service)."""

    max_new_tokens: int = 256
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0     # eos and stop_token_ids are banned until this many tokens exist

    def validate(self, vocab_size: int, max_new_tokens_limit: int) -> None:
        """Raise ValueError naming the first field that is out of range."""
        if not 1 <= self.max_new_tokens <= max_new_tokens_limit:
            raise ValueError(
                f"max_new_tokens must be in [1, {max_new_tokens_limit}], got {self.max_new_tokens}")
        if not 0 <= self.min_tokens <= self.max_new_tokens:
            raise ValueError(f"min_tokens must be in [0, max_new_tokens ({self.max_new_tokens})], "
                             f"got {self.min_tokens}")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids holds at most {MAX_STOP_TOKEN_IDS} ids, "
                             f"got {len(self.stop_token_ids)}")
        for token_id in self.stop_token_ids:
            if not 0 <= token_id < vocab_size:
                raise ValueError(
                    f"stop_token_ids entries must be in [0, {vocab_size}), got {token_id}")
