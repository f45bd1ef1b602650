"""Undecodable requests (bad UTF-8 in a string field, truncated bytes) -> INVALID_ARGUMENT.

Without this, grpc logs a traceback at ERROR and answers UNKNOWN when a request's bytes do not
parse. The interceptor wraps each unary-request handler's deserializer so that a parse error
becomes a marker object, and the handler answers INVALID_ARGUMENT for it.
"""
from __future__ import annotations

import contextlib
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import grpc


class _Undecodable:
    """Stands in for a request whose bytes could not be parsed."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def _guarded_deserializer(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    def guarded(data: bytes) -> Any:
        try:
            return deserialize(data) if deserialize is not None else data
        except Exception as error:  # protobuf DecodeError and friends
            return _Undecodable(str(error))
    return guarded


async def _reject(request: _Undecodable, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                        f"request: not a valid protobuf message ({request.error})")


def _guarded_behavior(behavior: Callable[..., Any]) -> Callable[..., Any] | None:
    if inspect.isasyncgenfunction(behavior):
        async def guarded_stream(request: Any, context: grpc.aio.ServicerContext):
            if isinstance(request, _Undecodable):
                await _reject(request, context)
            async with contextlib.aclosing(behavior(request, context)) as replies:
                async for reply in replies:
                    yield reply
        return guarded_stream
    if inspect.iscoroutinefunction(behavior):
        async def guarded_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Undecodable):
                await _reject(request, context)
            return await behavior(request, context)
        return guarded_unary
    return None  # a sync handler: leave it alone


class DecodeGuardInterceptor(grpc.aio.ServerInterceptor):
    """Answers INVALID_ARGUMENT (not UNKNOWN + a logged traceback) to unparsable requests."""

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.request_streaming:
            return handler
        if handler.response_streaming:
            behavior, make = handler.unary_stream, grpc.unary_stream_rpc_method_handler
        else:
            behavior, make = handler.unary_unary, grpc.unary_unary_rpc_method_handler
        guarded = _guarded_behavior(behavior)
        if guarded is None:
            return handler
        return make(guarded, request_deserializer=_guarded_deserializer(
                        handler.request_deserializer),
                    response_serializer=handler.response_serializer)
