"""One Generate request end to end on internal types: engine token stream -> text deltas.

Detokenizes incrementally, enforces stop strings (cut before the stop, abort the engine
request), and builds the usage of the last message.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import grpc

from tokenizer_svc.detokenizer import DecodeFn, IncrementalDetokenizer
from tokenizer_svc.schema import (EngineChunk, EngineRequest, FinishReason, OutputDelta,
                                  ResponseFormatSpec, ServiceError, TokenLogprobInfo,
                                  UsageCounts)
from tokenizer_svc.stops import StopStringMatcher

Item = TypeVar("Item")


class TokenSource(Protocol):
    """What the pipeline needs from the engine (EngineClient, or a fake in tests)."""

    def generate(self, request: EngineRequest,
                 timeout_s: float | None = None) -> AsyncIterator[EngineChunk]: ...

    async def abort(self, request_id: str, timeout_s: float = 1.0,
                    index: int | None = None) -> bool:
        """Abort the request (index: only that sample of an n-sample request)."""

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
class _SampleFeed:
    """One engine stream of an n-sample request read as n token sources, one per sample index:
    the first read starts the engine call, and each chunk goes to its sample's queue."""

    def __init__(self, request: EngineRequest, source: TokenSource) -> None:
        self._request = request
        self._source = source
        # per sample: its chunks, then None (the stream ended) or the error that ended it
        self._queues: list[asyncio.Queue] = [asyncio.Queue() for _ in range(request.n)]
        self._pump: asyncio.Task | None = None

    def sample(self, index: int) -> TokenSource:
        return _SampleSource(self, index)

    async def read(self, index: int, timeout_s: float | None) -> AsyncIterator[EngineChunk]:
        if self._pump is None:
            self._pump = asyncio.create_task(self._run(timeout_s))
        while (item := await self._queues[index].get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item

    async def abort(self, index: int, timeout_s: float) -> bool:
        return await self._source.abort(self._request.request_id, timeout_s, index=index)

    async def _run(self, timeout_s: float | None) -> None:
        end: Exception | None = None
        try:
            chunks = self._source.generate(self._request, timeout_s)
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    self._queues[chunk.index].put_nowait(chunk)
        except Exception as error:  # noqa: BLE001  (every sample's reader raises it)
            end = error
        for queue in self._queues:
            queue.put_nowait(end)

    async def close(self) -> None:
        """Cancel the engine call if it is still open."""
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.gather(self._pump, return_exceptions=True)


class _SampleSource:
    """The TokenSource of one sample of a _SampleFeed (abort ends only this sample)."""

    def __init__(self, feed: _SampleFeed, index: int) -> None:
        self._feed = feed
        self._index = index

    def generate(self, request: EngineRequest,
                 timeout_s: float | None = None) -> AsyncIterator[EngineChunk]:
        return self._feed.read(self._index, timeout_s)

    async def abort(self, request_id: str, timeout_s: float = 1.0) -> bool:
        return await self._feed.abort(self._index, timeout_s)


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


async def run_samples(request: EngineRequest, source: TokenSource,
                      open_stream: Callable[[TokenSource], AsyncGenerator[OutputDelta, None]]
                      ) -> AsyncIterator[OutputDelta]:
    """The request's n samples as one stream of deltas. n > 1 is one engine request (the engine
    prefills the prompt once and the samples share its KV rows; sample i draws with seed + i)
    whose chunks are split by index into n generation streams (`open_stream(source)`) and
    merged back: `index` tells the samples apart, each sample's last delta has its
    finish_reason, the stream's last delta the usage (the prompt once, every sample's
    completion tokens)."""
    if request.n == 1:
        async with contextlib.aclosing(open_stream(source)) as deltas:
            async for delta in deltas:
                yield delta
        return
    feed = _SampleFeed(request, source)
    usage = UsageCounts(prompt_tokens=len(request.prompt_token_ids))
    running = request.n
    try:
        async for index, delta in merge_streams([open_stream(feed.sample(i))
                                                 for i in range(request.n)]):
            delta.index = index
            if delta.finish_reason is not None:
                running -= 1
                if delta.usage is not None:
                    usage.completion_tokens += delta.usage.completion_tokens
                    usage.cached_prompt_tokens = max(usage.cached_prompt_tokens,
                                                     delta.usage.cached_prompt_tokens)
                delta.usage = usage if running == 0 else None
            yield delta
    finally:
        await feed.close()
