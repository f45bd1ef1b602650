"""One Generate request end to end on internal types: engine token stream -> text deltas.

Detokenizes incrementally, enforces stop strings (cut before the stop, abort the engine
request), and builds the usage of the last message.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from tokenizer_svc.detokenizer import DecodeFn, IncrementalDetokenizer
from tokenizer_svc.schema import (EngineChunk, EngineRequest, FinishReason, OutputDelta,
                                  ServiceError, TokenLogprobInfo, UsageCounts)
from tokenizer_svc.stops import StopStringMatcher


class TokenSource(Protocol):
    """What the pipeline needs from the engine (EngineClient, or a fake in tests)."""

    def generate(self, request: EngineRequest,
                 timeout_s: float | None = None) -> AsyncIterator[EngineChunk]: ...

    async def abort(self, request_id: str, timeout_s: float = 1.0) -> bool: ...


@dataclass(slots=True)
class _StreamState:
    """Accumulates one engine chunk's worth of output while it is processed token by token."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobInfo] = field(default_factory=list)


class GenerationStream:
    """Runs one request against a TokenSource and yields OutputDelta messages."""

    def __init__(self, request: EngineRequest, stops: Sequence[str], decode: DecodeFn,
                 source: TokenSource, abort_drain_timeout_s: float = 0.5) -> None:
        self._request = request
        self._source = source
        self._detokenizer = IncrementalDetokenizer(decode)
        self._matcher = StopStringMatcher(stops)
        self._abort_drain_timeout_s = abort_drain_timeout_s
        self.completion_tokens = 0

    async def run(self, timeout_s: float | None = None) -> AsyncIterator[OutputDelta]:
        """Yield deltas; the last one carries finish_reason and usage."""
        chunks = self._source.generate(self._request, timeout_s)
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                state, stopped = self._consume(chunk)
                if stopped:  # abort unless the engine already finished with this chunk
                    usage = (chunk.usage if chunk.finish_reason is not None
                             else await self._abort_and_drain(chunks))
                    yield self._final(state, FinishReason.STOP_SEQUENCE, usage)
                    return
                if chunk.finish_reason is not None:
                    yield self._finish(state, chunk)
                    return
                if state.token_ids or state.text:
                    yield OutputDelta("".join(state.text), state.token_ids, state.logprobs)
        raise ServiceError(grpc.StatusCode.INTERNAL,
                           "engine stream ended without a finish reason")

    def _consume(self, chunk: EngineChunk) -> tuple[_StreamState, bool]:
        """Feed a chunk's ids one at a time; stop at the token that completes a stop string."""
        state = _StreamState()
        logprobs = chunk.logprobs if len(chunk.logprobs) == len(chunk.token_ids) else []
        for index, token_id in enumerate(chunk.token_ids):
            self.completion_tokens += 1
            state.token_ids.append(token_id)
            if logprobs:
                state.logprobs.append(logprobs[index])
            result = self._matcher.feed(self._detokenizer.add((token_id,)))
            state.text.append(result.text)
            if result.stopped:
                return state, True
        return state, False

    def _finish(self, state: _StreamState, chunk: EngineChunk) -> OutputDelta:
        """The engine ended the request: flush held text (it may still complete a stop)."""
        result = self._matcher.feed(self._detokenizer.flush())
        state.text.append(result.text)
        if result.stopped:
            return self._final(state, FinishReason.STOP_SEQUENCE, chunk.usage)
        state.text.append(self._matcher.flush())
        assert chunk.finish_reason is not None
        completion = chunk.usage.completion_tokens if chunk.usage else self.completion_tokens
        return self._final(state, chunk.finish_reason, chunk.usage,
                           completion_tokens=max(completion, self.completion_tokens))

    def _final(self, state: _StreamState, reason: FinishReason, engine_usage: UsageCounts | None,
               completion_tokens: int | None = None) -> OutputDelta:
        usage = UsageCounts(
            prompt_tokens=len(self._request.prompt_token_ids),
            completion_tokens=self.completion_tokens if completion_tokens is None
            else completion_tokens,
            cached_prompt_tokens=engine_usage.cached_prompt_tokens if engine_usage else 0)
        return OutputDelta("".join(state.text), state.token_ids, state.logprobs, reason, usage)

    async def _abort_and_drain(self, chunks: AsyncIterator[EngineChunk]) -> UsageCounts | None:
        """Abort the engine request, then wait briefly for its last message (for its usage)."""
        await self._source.abort(self._request.request_id)
        try:
            async with asyncio.timeout(self._abort_drain_timeout_s):
                async for chunk in chunks:
                    if chunk.finish_reason is not None:
                        return chunk.usage
        except (TimeoutError, ServiceError):
            pass
        return None
