"""One Generate request end to end on internal types: engine token stream -> text deltas.

Detokenizes incrementally, enforces stop strings (cut before the stop, abort the engine
request), and builds the usage of the last message.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import grpc

from tokenizer_svc.detokenizer import DecodeFn, IncrementalDetokenizer
from tokenizer_svc.schema import (EngineChunk, EngineRequest, FinishReason, OutputDelta,
                                  ResponseFormatSpec, ServiceError, TokenLogprobInfo,
                                  UsageCounts)
from tokenizer_svc.stops import StopStringMatcher

MAX_SEED = 2**63
Item = TypeVar("Item")


class TokenSource(Protocol):
    """What the pipeline needs from the engine (EngineClient, or a fake in tests)."""

    def generate(self, request: EngineRequest,
                 timeout_s: float | None = None) -> AsyncIterator[EngineChunk]: ...

    async def abort(self, request_id: str, timeout_s: float = 1.0) -> bool: ...

    async def check_response_format(self, spec: ResponseFormatSpec,
                                    timeout_s: float = 30.0) -> None: ...


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


# ---- n samples of one prompt ------------------------------------------------------------------
def sample_request(request: EngineRequest, index: int) -> EngineRequest:
    """Sample `index` of a request: sample 0 is the request itself; sample i > 0 gets its own
    engine request id and, when seeded, seed + i."""
    if index == 0:
        return request
    seed = request.sampling.seed
    sampling = (request.sampling if seed is None
                else dataclasses.replace(request.sampling, seed=(seed + index) % MAX_SEED))
    return dataclasses.replace(request, request_id=f"{request.request_id}/{index}",
                               sampling=sampling)


async def merge_streams(streams: Sequence[AsyncGenerator[Item, None]]
                        ) -> AsyncIterator[tuple[int, Item]]:
    """Items of several streams as they arrive, with the stream's position. The first error
    ends the merge; every stream still open is cancelled (its engine call with it) on exit."""
    queue: asyncio.Queue[tuple[int, Item | None, BaseException | None, bool]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncGenerator[Item, None]) -> None:
        try:
            async with contextlib.aclosing(stream):
                async for item in stream:
                    queue.put_nowait((index, item, None, False))
            queue.put_nowait((index, None, None, True))
        except Exception as error:  # noqa: BLE001  (handed to the consumer)
            queue.put_nowait((index, None, error, True))

    tasks = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        open_streams = len(tasks)
        while open_streams:
            index, item, error, finished = await queue.get()
            if error is not None:
                raise error
            if finished:
                open_streams -= 1
            else:
                yield index, item  # type: ignore[misc]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def run_samples(request: EngineRequest, n: int,
                      open_stream: Callable[[EngineRequest], AsyncGenerator[OutputDelta, None]]
                      ) -> AsyncIterator[OutputDelta]:
    """n samples of one prompt, for now as n engine requests (the engine-side version sharing
    the prompt's KV rows replaces this function), merged into one stream: `index` tells the
    samples apart, each sample's last delta has its finish_reason, the stream's last delta the
    usage (prompt once, every sample's completion tokens, the cached prompt tokens of the
    sample that found the fewest)."""
    if n == 1:
        async with contextlib.aclosing(open_stream(request)) as deltas:
            async for delta in deltas:
                yield delta
        return
    usage = UsageCounts(prompt_tokens=len(request.prompt_token_ids))
    cached: list[int] = []
    running = n
    streams = [open_stream(sample_request(request, i)) for i in range(n)]
    async for index, delta in merge_streams(streams):
        delta.index = index
        if delta.finish_reason is not None:
            running -= 1
            if delta.usage is not None:
                usage.completion_tokens += delta.usage.completion_tokens
                cached.append(delta.usage.cached_prompt_tokens)
            delta.usage = None
            if running == 0:
                usage.cached_prompt_tokens = min(cached, default=0)
                delta.usage = usage
        yield delta
