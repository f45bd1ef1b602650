"""One engine request carried across engines: when its engine fails mid-stream (UNAVAILABLE,
a reset, a crashed loop, a queue that is full, or the pool giving up on a lost or stalled
engine), what is left is resubmitted to another engine and the caller sees one stream.

The resubmission is the prompt plus the tokens streamed so far (num_generated_prompt_tokens
says how many of them were generated: the engine's penalties count them as output and seeded
sampling continues at their positions), the rest of max_new_tokens and min_tokens, and the same
sampling settings; usage is reported as if nothing happened (the original prompt, every token).
An n-sample request that fails after some tokens continues as one request per unfinished sample
(sample i with seed + i, as the engine seeds it). Retries are bounded (--max-engine-retries per
request, every engine tried at most once); past them the request fails UNAVAILABLE.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from tokenizer_svc.config import FrontendConfig
from tokenizer_svc.engine_client import EngineClient, EngineStream
from tokenizer_svc.engine_targets import EngineTargets
from tokenizer_svc.metrics import FrontendMetrics
from tokenizer_svc.generation import merge_streams
from tokenizer_svc.schema import (EngineChunk, EngineRequest, FinishReason, ServiceError,
                                  UsageCounts)

log = logging.getLogger("tokenizer_svc")
MAX_SEED = 2**63
# Engine failures worth another engine (DEADLINE_EXCEEDED, INVALID_ARGUMENT, ... are not).
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL,
             grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNKNOWN}


class Endpoint(Protocol):
    """What a flight needs of one engine (engine_pool.Endpoint)."""

    address: str
    client: EngineClient


class LeaseView(Protocol):
    """An open call as the pool tracks it (engine_pool.Lease)."""

    last_progress: float
    lost: str | None


class Pool(Protocol):
    """What a flight needs of the engine pool (engine_pool.EnginePool)."""

    config: FrontendConfig
    metrics: FrontendMetrics
    targets: EngineTargets

    def pick(self, prompt_ids: Sequence[int], excluded: set[str]) -> Endpoint | None: ...

    def lease(self, endpoint: Endpoint, stream: EngineStream
              ) -> AbstractContextManager[LeaseView]: ...

    def count_error(self, endpoint: Endpoint, code: grpc.StatusCode) -> None: ...


class EngineFailed(Exception):
    """An engine call failed in a way another engine may not."""

    def __init__(self, error: ServiceError) -> None:
        super().__init__(error.message)
        self.error = error


@dataclass(slots=True)
class SampleProgress:
    """What one sample of the request has streamed so far."""

    tokens: list[int] = field(default_factory=list)
    finished: bool = False
    aborting: bool = False
    resumed: bool = False   # its tokens so far were resubmitted (the engine's counts are off)


class Flight:
    """A request in flight over the pool's engines (one per request, made by EnginePool)."""

    def __init__(self, pool: Pool, request: EngineRequest,
                 timeout_s: float | None) -> None:
        self.pool = pool
        self.request = request
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.samples = [SampleProgress() for _ in range(request.n)]
        self.calls = 0     # engine calls made (each has its own engine request id)
        self.retries = 0
        # open engine calls: key None = the whole request (all samples), i = sample i alone
        self.active: dict[int | None, tuple[Endpoint, str]] = {}

    async def run(self) -> AsyncIterator[EngineChunk]:
        async with contextlib.aclosing(self._serve(None, set())) as chunks:
            async for chunk in chunks:
                yield chunk

    # ---- attempts -----------------------------------------------------------------------------
    async def _serve(self, index: int | None, excluded: set[str]) -> AsyncIterator[EngineChunk]:
        """Sample `index` (None: every sample) to its end, moving engines on failures."""
        error: ServiceError | None = None
        while True:
            if self._all_aborting(index):
                for chunk in self._aborted(index):
                    yield chunk
                return
            endpoint = self.pool.pick(self.request.prompt_token_ids, excluded)
            if endpoint is None:
                raise error or ServiceError(grpc.StatusCode.UNAVAILABLE,
                                            f"no engine available at "
                                            f"{self.pool.targets.describe()}")
            try:
                async with contextlib.aclosing(self._attempt(endpoint, index)) as chunks:
                    async for chunk in chunks:
                        yield chunk
                return
            except EngineFailed as failure:
                error = failure.error
                excluded.add(endpoint.address)
                if not self._all_aborting(index):   # (an aborted one just ends, above)
                    self._note_failure(endpoint, error)
            if index is None and self.request.n > 1 and self._started():
                streams = [self._serve(i, set(excluded)) for i, sample in enumerate(self.samples)
                           if not sample.finished]
                async for _, chunk in merge_streams(streams):
                    yield chunk
                return

    def _note_failure(self, endpoint: Endpoint, error: ServiceError) -> None:
        self.retries += 1
        limit = self.pool.config.max_engine_retries
        if self.retries > limit:
            code = (error.code if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                    else grpc.StatusCode.UNAVAILABLE)
            raise ServiceError(code, f"{error.message} (gave up after {limit} engine retries, "
                                     f"--max-engine-retries)")
        if self._started():
            self.pool.metrics.failovers_total.labels(endpoint.address).inc()
        log.warning("request %s: %s; resubmitting (%d of %d retries)", self.request.request_id,
                    error.message, self.retries, limit)

    async def _attempt(self, endpoint: Endpoint, index: int | None
                       ) -> AsyncIterator[EngineChunk]:
        """One engine call; EngineFailed when it failed in a retryable way."""
        request = self._engine_request(index)
        if request is None:   # every token arrived, only the last message was lost
            yield self._final(index or 0, FinishReason.LENGTH)
            return
        timeout = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
        stream = endpoint.client.open_stream(request, timeout)
        self.active[index] = (endpoint, request.request_id)
        lease = None
        try:
            with self.pool.lease(endpoint, stream) as lease:
                async for chunk in stream:
                    lease.last_progress = time.monotonic()
                    if index is not None:
                        chunk.index = index   # a sample alone: the engine calls it 0
                    self._record(chunk)
                    yield chunk
        except ServiceError as error:
            self.pool.count_error(endpoint, error.code)
            if error.code in RETRYABLE:
                raise EngineFailed(error) from None
            raise
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if lease is None or lease.lost is None or (task is not None and task.cancelling()):
                raise   # our own caller cancelled us
            self.pool.count_error(endpoint, grpc.StatusCode.CANCELLED)
            raise EngineFailed(ServiceError(grpc.StatusCode.UNAVAILABLE,
                                            f"engine at {endpoint.address} {lease.lost}")
                               ) from None
        finally:
            stream.cancel()
            self.active.pop(index, None)

    def _engine_request(self, index: int | None) -> EngineRequest | None:
        """The engine request of this attempt: the whole request while nothing was streamed,
        else sample `index` (0 for a one-sample request) resumed from its tokens so far."""
        call, self.calls = self.calls, self.calls + 1
        request_id = (self.request.request_id if call == 0
                      else f"{self.request.request_id}~{call}")
        if index is None and not self._started():
            return dataclasses.replace(self.request, request_id=request_id)
        sample = index or 0
        done = len(self.samples[sample].tokens)
        if done >= self.request.max_new_tokens:
            return None
        self.samples[sample].resumed = True
        sampling, seed = self.request.sampling, self.request.sampling.seed
        if seed is not None and sample:
            sampling = dataclasses.replace(sampling, seed=(seed + sample) % MAX_SEED)
        return dataclasses.replace(
            self.request, request_id=request_id, n=1, sampling=sampling,
            prompt_token_ids=self.request.prompt_token_ids + self.samples[sample].tokens,
            max_new_tokens=self.request.max_new_tokens - done,
            min_tokens=max(0, self.request.min_tokens - done), num_generated_prompt_tokens=done)

    # ---- progress -----------------------------------------------------------------------------
    def _started(self) -> bool:
        return any(s.tokens or s.finished for s in self.samples)

    def _record(self, chunk: EngineChunk) -> None:
        sample = self.samples[chunk.index]
        sample.tokens.extend(chunk.token_ids)
        if chunk.finish_reason is not None:
            sample.finished = True
            usage = chunk.usage or UsageCounts()
            if sample.resumed or chunk.usage is None:   # as if it had run on one engine
                prompt = len(self.request.prompt_token_ids)
                chunk.usage = UsageCounts(prompt, len(sample.tokens),
                                          min(usage.cached_prompt_tokens, prompt))

    def _final(self, index: int, reason: FinishReason) -> EngineChunk:
        chunk = EngineChunk([], finish_reason=reason, index=index)
        self._record(chunk)
        return chunk

    # ---- abort --------------------------------------------------------------------------------
    def _all_aborting(self, index: int | None) -> bool:
        chosen = self.samples if index is None else [self.samples[index]]
        return all(s.aborting or s.finished for s in chosen)

    def _aborted(self, index: int | None) -> list[EngineChunk]:
        indices = range(self.request.n) if index is None else [index]
        return [self._final(i, FinishReason.ABORTED) for i in indices
                if not self.samples[i].finished]

    async def abort(self, index: int | None, timeout_s: float) -> bool:
        """Abort the request (index: that sample only) on whichever engine runs it now."""
        for i, sample in enumerate(self.samples):
            if index is None or i == index:
                sample.aborting = True
        calls = []
        for key, (endpoint, engine_id) in list(self.active.items()):
            if key is None:   # the whole request's call: the engine knows the samples' index
                calls.append(endpoint.client.abort(engine_id, timeout_s, index=index))
            elif index is None or key == index:
                calls.append(endpoint.client.abort(engine_id, timeout_s))
        return any(await asyncio.gather(*calls)) if calls else False
