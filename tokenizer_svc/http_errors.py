"""Errors of the HTTP edge in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

The core's ServiceError codes map to the HTTP statuses an OpenAI client expects; messages keep
the core's limits but name the fields as the OpenAI API does (max_tokens, not
stopping.max_new_tokens).
"""
from __future__ import annotations

import json

import grpc
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from tokenizer_svc.schema import ServiceError

RETRY_AFTER_S = 1
# gRPC status -> (HTTP status, OpenAI error type, error code)
_STATUS: dict[grpc.StatusCode, tuple[int, str, str | None]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error", None),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error", None),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error", None),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error", "model_not_found"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict_error", "request_id_in_flight"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "queue_full"),
    grpc.StatusCode.CANCELLED: (499, "cancelled", None),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable", "engine_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout", None),
}
# Internal field names -> OpenAI's, applied in this order to the start of core messages.
_RENAMES = (("sampling.", ""), ("stopping.max_new_tokens", "max_tokens"), ("stopping.", ""),
            ("chat.messages", "messages"), ("max_new_tokens", "max_tokens"))
_FIELDS = {"model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature",
           "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
           "repetition_penalty", "seed", "stop", "stop_token_ids", "n", "logprobs",
           "top_logprobs", "logit_bias", "response_format", "min_tokens", "echo", "suffix",
           "best_of", "tokens", "x-request-id"}


class ClientGone(Exception):
    """The HTTP client disconnected before its response was ready."""


def error_body(status: int, message: str, error_type: str, param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(status: int, message: str, error_type: str, param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    headers = {"retry-after": str(RETRY_AFTER_S)} if status == 429 else None
    return JSONResponse(error_body(status, message, error_type, param, code),
                        status_code=status, headers=headers)


def openai_message(message: str, chat: bool = False, completions: bool = False
                   ) -> tuple[str, str | None]:
    """A core message with OpenAI's field names, and the field it names (None if none)."""
    for internal, public in _RENAMES:
        message = message.replace(internal, public)
    if message.startswith("token_ids"):
        message = "tokens" + message.removeprefix("token_ids")
    if message.startswith("request_id"):
        message = "x-request-id" + message.removeprefix("request_id")
    if chat and message.startswith("prompt"):  # the rendered chat is the prompt
        message = message.replace("prompt", "messages", 1)
    if completions and message.startswith("top_logprobs"):
        message = "logprobs" + message.removeprefix("top_logprobs")
    word = message.split(" ", 1)[0].rstrip(":,")
    root = word.split("[", 1)[0].split(".", 1)[0]
    return message, (word if root in _FIELDS else None)


def service_error_response(error: ServiceError, chat: bool = False,
                           completions: bool = False) -> JSONResponse:
    """A core error as the HTTP response an OpenAI client expects."""
    status, error_type, code = _STATUS.get(error.code, (500, "server_error", None))
    message, param = openai_message(error.message, chat, completions)
    return error_response(status, message, error_type, param, code)


def validation_error_response(error: RequestValidationError) -> JSONResponse:
    """A body that does not parse or has a field of the wrong type: 400 naming the field."""
    first = error.errors()[0] if error.errors() else {}
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return error_response(400, f"the body is not valid JSON: {first.get('msg', '')}",
                              "invalid_request_error")
    param = ".".join(location) or None
    if param is None:
        return error_response(400, f"the body must be a JSON object: {first.get('msg', '')}",
                              "invalid_request_error")
    message = f"{param}: {first.get('msg', 'invalid value')}"
    if first.get("input") is not None:
        message += f", got {json.dumps(first['input'], default=str)[:80]}"
    return error_response(400, message, "invalid_request_error", param)
