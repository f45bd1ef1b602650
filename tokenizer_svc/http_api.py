"""The OpenAI-compatible HTTP edge: FastAPI routes over the same FrontendCore as gRPC.

Bodies are translated by http_openai.py (requests) and http_render.py (responses); everything
else (admission, validation, tokenization, stop strings, detokenization, metrics) is the
core's. Errors take OpenAI's shape {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenizer_svc.frontend import FrontendCore
from tokenizer_svc.generation import merge_streams
from tokenizer_svc.http_errors import (ClientGone, error_response, service_error_response,
                                       validation_error_response)
from tokenizer_svc.http_openai import (ChatCompletionBody, CompletionBody, DetokenizeBody,
                                       LogprobRequest, TokenizeBody, chat_request, chat_turns,
                                       completion_requests)
from tokenizer_svc.http_render import FINISH_REASONS, ChoiceState, Renderer, sse
from tokenizer_svc.schema import OutputDelta, ServiceError, TextRequest, UsageCounts
from tokenizer_svc.security import bearer_matches
from tokenizer_svc.validation import validate_request_id

log = logging.getLogger("tokenizer_svc")
PROTOCOL = "http"
REQUEST_ID_HEADER = "x-request-id"
GENERATE_PATHS = ("/v1/chat/completions", "/v1/completions")
Result = TypeVar("Result")
Choices = AsyncIterator[tuple[int, OutputDelta]]


async def _wait_disconnect(receive: Callable[[], Awaitable[dict]]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, work: Awaitable[Result]) -> Result:
    """Await `work` unless the client goes away first: then cancel it and raise ClientGone."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientGone()
    return task.result()


class EventStream(StreamingResponse):
    """text/event-stream whose source is cancelled (engine request aborted, KV freed) as soon as
    the client disconnects, not only at the next write."""

    def __init__(self, events: AsyncIterator[bytes], headers: dict[str, str]) -> None:
        super().__init__(events, headers={"cache-control": "no-cache", **headers},
                         media_type="text/event-stream")
        self._events = events

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        pump = asyncio.ensure_future(self._pump(send))
        gone = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait({pump, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pump, gone):
                task.cancel()
            outcome, _ = await asyncio.gather(pump, gone, return_exceptions=True)
        if isinstance(outcome, Exception) and not isinstance(outcome, OSError):
            log.error("SSE stream failed: %r", outcome)  # a write to a gone client is OSError

    async def _pump(self, send: Callable) -> None:
        async with contextlib.aclosing(self._events) as events:  # type: ignore[type-var]
            async for event in events:
                await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class OpenAIRoutes:
    """The route handlers of one service: its core and whether it is serving."""

    def __init__(self, core: FrontendCore, is_serving: Callable[[], bool]) -> None:
        self.core = core
        self.is_serving = is_serving
        self.started = int(time.time())

    def request_id(self, request: Request) -> str:
        request_id = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        try:
            validate_request_id(request_id)
        except ValueError as error:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        return request_id

    def renderer(self, chat: bool, request_id: str, logprobs: LogprobRequest,
                 include_usage: bool) -> Renderer:
        return Renderer(chat=chat, response_id=("chatcmpl-" if chat else "cmpl-") + request_id,
                        model=self.core.model_name, created=int(time.time()),
                        logprobs=logprobs, token_bytes=self.core.tokenizer.token_bytes,
                        include_usage=include_usage)

    async def choices(self, requests: list[TextRequest]) -> Choices:
        """(choice index, delta) of every prompt's n samples, in arrival order."""
        if len(requests) == 1:
            async with contextlib.aclosing(self.core.generate(requests[0], PROTOCOL)) as deltas:
                async for delta in deltas:
                    yield delta.index, delta
            return
        n = requests[0].n
        merged = merge_streams([self.core.generate(request, PROTOCOL) for request in requests])
        async with contextlib.aclosing(merged):
            async for prompt, delta in merged:
                yield prompt * n + delta.index, delta

    async def generate(self, request: Request, request_id: str, requests: list[TextRequest],
                       stream: bool, render: Renderer) -> Response:
        """Run the requests; SSE or one JSON body. Errors before the first token get their
        HTTP status; later ones end the stream with an error event."""
        choices = self.choices(requests)
        count = len(requests) * requests[0].n
        headers = {REQUEST_ID_HEADER: request_id}
        if not stream:
            states, usage = await until_disconnect(request, _collect(choices, count))
            return JSONResponse(render.response(states, usage), headers=headers)
        first = await until_disconnect(request, anext(choices))
        return EventStream(_events(first, choices, count, render), headers)

    async def chat_completions(self, body: ChatCompletionBody, request: Request) -> Response:
        self.core.check_model(body.model)
        request_id = self.request_id(request)
        text_request, logprobs = _bad_field(lambda: chat_request(body, request_id))
        render = self.renderer(True, request_id, logprobs, body.include_usage)
        return await self.generate(request, request_id, [text_request], bool(body.stream),
                                   render)

    async def completions(self, body: CompletionBody, request: Request) -> Response:
        self.core.check_model(body.model)
        request_id = self.request_id(request)
        requests, logprobs = _bad_field(lambda: completion_requests(body, request_id))
        render = self.renderer(False, request_id, logprobs, body.include_usage)
        return await self.generate(request, request_id, requests, bool(body.stream), render)

    async def models(self) -> dict:
        limits = self.core.known_limits
        return {"object": "list", "data": [{
            "id": self.core.model_name, "object": "model", "created": self.started,
            "owned_by": "llmserve",
            "max_model_len": limits.max_model_len if limits is not None else None}]}

    async def health(self) -> Response:
        if self.is_serving():
            return JSONResponse({"status": "serving"})
        return JSONResponse({"status": "not serving"}, status_code=503)

    async def tokenize(self, body: TokenizeBody) -> dict:
        if body.model is not None:
            self.core.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT,
                               "set exactly one of prompt or messages")
        if body.prompt is not None:
            ids = await self.core.tokenize(body.prompt, body.add_special_tokens, PROTOCOL)
        else:
            chat = _bad_field(lambda: chat_turns(body.messages or []))
            ids = await _bad_field_async(self.core.prompt_ids(
                TextRequest(request_id="tokenize", chat=chat), PROTOCOL))
        limits = self.core.known_limits
        return {"count": len(ids), "tokens": ids,
                "max_model_len": limits.max_model_len if limits is not None else None}

    async def detokenize(self, body: DetokenizeBody) -> dict:
        if body.model is not None:
            self.core.check_model(body.model)
        text = await _bad_field_async(self.core.detokenize(body.tokens, body.skip_special_tokens))
        return {"prompt": text}


def _bad_field(build: Callable[[], Result]) -> Result:
    try:
        return build()
    except ValueError as error:
        raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None


async def _bad_field_async(work: Awaitable[Result]) -> Result:
    try:
        return await work
    except ValueError as error:
        raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None


async def _collect(choices: Choices, count: int) -> tuple[list[ChoiceState], UsageCounts]:
    states = [ChoiceState() for _ in range(count)]
    usage = UsageCounts()
    async for index, delta in choices:
        state = states[index]
        state.text.append(delta.text)
        state.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            state.finish_reason = FINISH_REASONS[delta.finish_reason]
        _add_usage(usage, delta.usage)
    return states, usage


def _add_usage(total: UsageCounts, usage: UsageCounts | None) -> None:
    if usage is not None:
        total.prompt_tokens += usage.prompt_tokens
        total.completion_tokens += usage.completion_tokens
        total.cached_prompt_tokens += usage.cached_prompt_tokens


async def _events(first: tuple[int, OutputDelta], choices: Choices, count: int,
                  render: Renderer) -> AsyncIterator[bytes]:
    """The SSE events of a stream whose first delta has already arrived."""
    usage = UsageCounts()
    try:
        if render.chat:
            for index in range(count):
                yield render.role_chunk(index)
        pending: tuple[int, OutputDelta] | None = first
        while pending is not None:
            index, delta = pending
            _add_usage(usage, delta.usage)
            event = render.delta_chunk(index, delta)
            if event is not None:
                yield event
            pending = await anext(choices, None)
    except ServiceError as error:
        yield sse(service_error_response(error).body.decode())
    else:
        if render.include_usage:
            yield render.usage_chunk(usage)
    finally:
        await choices.aclose()  # type: ignore[attr-defined]
    yield sse("[DONE]")


class AccessGate:
    """ASGI middleware run before any parsing: the API key (every path but /health) and the
    body size limit (--max-message-bytes, as on gRPC)."""

    def __init__(self, app: Callable, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            headers = dict(scope["headers"])
            refusal = self._refusal(headers.get(b"authorization"),
                                    headers.get(b"content-length"))
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, authorization: bytes | None, length: bytes | None) -> Response | None:
        if self.api_key and not bearer_matches(
                None if authorization is None else (("authorization", authorization),),
                self.api_key):
            return error_response(401, "missing or wrong API key: send the header "
                                       "'Authorization: Bearer <key>'",
                                  "authentication_error", code="invalid_api_key")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return error_response(413, f"the body is {int(length)} bytes; the limit is "
                                       f"{self.max_body_bytes} (--max-message-bytes)",
                                  "invalid_request_error")
        return None


def build_app(core: FrontendCore, is_serving: Callable[[], bool]) -> AccessGate:
    """The ASGI app of the OpenAI HTTP API (FastAPI behind the API key / body size gate)."""
    routes = OpenAIRoutes(core, is_serving)
    app = FastAPI(title="llmserve (OpenAI-compatible)", docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.add_api_route("/v1/chat/completions", routes.chat_completions, methods=["POST"])
    app.add_api_route("/v1/completions", routes.completions, methods=["POST"])
    app.add_api_route("/v1/models", routes.models, methods=["GET"])
    app.add_api_route("/tokenize", routes.tokenize, methods=["POST"])
    app.add_api_route("/detokenize", routes.detokenize, methods=["POST"])
    app.add_api_route("/health", routes.health, methods=["GET"])

    async def on_service_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, ServiceError)
        return service_error_response(error, chat=request.url.path.endswith("/chat/completions"),
                                      completions=request.url.path == "/v1/completions")

    async def on_validation_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, RequestValidationError)
        if request.url.path in GENERATE_PATHS:  # a failed generation request, never in the core
            core.metrics.requests_total.labels("invalid_argument", PROTOCOL).inc()
        return validation_error_response(error)

    async def on_http_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, StarletteHTTPException)
        return error_response(error.status_code, str(error.detail), "invalid_request_error")

    async def on_client_gone(request: Request, error: Exception) -> Response:
        return Response(status_code=499)  # nobody is listening any more

    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(ClientGone, on_client_gone)
    return AccessGate(app, core.config.api_key, core.config.max_message_bytes)
