"""The protocol-neutral front door behind both edges (gRPC server.py, OpenAI HTTP http_api.py).

Admission (request id, in-flight limit), validation, tokenization, sizing the engine request,
running the GenerationStream, turning failures into ServiceError codes and the frontend metrics
all live here, once. The edges only convert their wire format to and from schema.py types.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator

import grpc

from tokenizer_svc.config import FrontendConfig
from tokenizer_svc.generation import GenerationStream, TokenSource, run_samples
from tokenizer_svc.metrics import FrontendMetrics
from tokenizer_svc.schema import (EngineLimits, EngineRequest, OutputDelta, ServiceError,
                                  TextRequest)
from tokenizer_svc.tokenizer import ModelTokenizer
from tokenizer_svc.validation import (check_min_tokens, resolve_max_new_tokens,
                                      validate_input, validate_request, validate_request_id,
                                      validate_token_ids, validate_vocab_fields)

THREAD_TOKENIZE_CHARS = 8192  # longer prompts are tokenized in a worker thread
# The client's deadline fires first (ours starts when its request arrives, a transit later), and
# its cancel reaches us slightly before our own deadline: count such a cancel as a deadline.
DEADLINE_SLACK_S = 0.1
ENGINE_ID_PUBLIC_CHARS = 64   # of the client's request_id kept in the engine's (for logs)


class EngineState:
    """What is known about the engines right now (kept up to date by engine_pool.EnginePool):
    the model limits they agree on."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.limits: EngineLimits | None = None

    def require_limits(self) -> EngineLimits:
        if self.limits is None:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE,
                               f"engine at {self.address} unavailable: model info not loaded "
                               f"yet (GetInfo has not succeeded)")
        return self.limits


class FrontendCore:
    """One tokenizer, the engines: generate, tokenize, detokenize and model info for any edge."""

    def __init__(self, config: FrontendConfig, tokenizer: ModelTokenizer, source: TokenSource,
                 engine: EngineState, metrics: FrontendMetrics) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.metrics = metrics
        self._source = source
        self._engine = engine
        self._inflight = 0
        # engine request ids: unique per front (a random tag) and per request (a counter), so
        # two clients with the same request_id never meet in an engine
        self._engine_id_tag = secrets.token_hex(4)
        self._engine_ids = itertools.count(1)

    # ---- generate ------------------------------------------------------------------------------
    async def generate(self, request: TextRequest, protocol: str,
                       timeout_s: float | None = None) -> AsyncIterator[OutputDelta]:
        """Admit, validate, tokenize and stream the request's deltas.

        Raises ServiceError (INVALID_ARGUMENT for a bad field) before or during the stream;
        cancellation propagates, counted as DEADLINE_EXCEEDED once timeout_s has passed.
        """
        started = time.perf_counter()
        deadline = None if timeout_s is None else started + timeout_s
        try:
            self._admit(request.request_id)
        except ServiceError as error:
            self.metrics.requests_total.labels(error.code.name.lower(), protocol).inc()
            raise
        self._inflight += 1
        inflight = self.metrics.inflight_requests.labels(protocol)
        inflight.inc()
        code = grpc.StatusCode.OK
        try:
            # aclosing: a consumer that stops early closes the whole chain down to the engine
            # call now, not whenever the garbage collector gets to it.
            async with contextlib.aclosing(self._run(request, protocol, started,
                                                     deadline)) as deltas:
                async for delta in deltas:
                    yield delta
        except ValueError as error:
            code = grpc.StatusCode.INVALID_ARGUMENT
            raise ServiceError(code, str(error)) from None
        except ServiceError as error:
            code = error.code
            raise
        except (asyncio.CancelledError, GeneratorExit):
            code = (grpc.StatusCode.DEADLINE_EXCEEDED
                    if deadline is not None and deadline - time.perf_counter() <= DEADLINE_SLACK_S
                    else grpc.StatusCode.CANCELLED)
            raise
        finally:
            self._inflight -= 1
            inflight.dec()
            self.metrics.requests_total.labels(code.name.lower(), protocol).inc()
            self.metrics.request_latency_seconds.labels(protocol).observe(
                time.perf_counter() - started)

    def _admit(self, request_id: str) -> None:
        try:
            validate_request_id(request_id)
        except ValueError as error:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        if self._inflight >= self.config.max_concurrent:
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"too many concurrent requests: limit is "
                               f"{self.config.max_concurrent} (--max-concurrent)")

    async def _run(self, request: TextRequest, protocol: str, started: float,
                   deadline: float | None) -> AsyncIterator[OutputDelta]:
        engine_request = await self._prepare(request, protocol)
        timeout_s = None if deadline is None else max(0.0, deadline - time.perf_counter())

        def open_stream(source: TokenSource) -> AsyncGenerator[OutputDelta, None]:
            return GenerationStream(engine_request, request.stop,
                                    self.tokenizer.stream_decoder, source,
                                    self.config.abort_drain_timeout_s).run(timeout_s)

        first_token_seen = False
        samples = run_samples(engine_request, self._source, open_stream)
        async with contextlib.aclosing(samples):
            async for delta in samples:
                if delta.token_ids and not first_token_seen:
                    first_token_seen = True
                    self.metrics.time_to_first_token_seconds.labels(protocol).observe(
                        time.perf_counter() - started)
                yield delta

    async def _tokenize_input(self, request: TextRequest, protocol: str) -> list[int]:
        chars = (len(request.prompt) if request.prompt is not None
                 else sum(len(turn.content) for turn in request.chat or []))
        if chars > THREAD_TOKENIZE_CHARS:  # long input: keep the event loop responsive
            return await asyncio.to_thread(self._prompt_ids, request, protocol)
        return self._prompt_ids(request, protocol)

    def _prompt_ids(self, request: TextRequest, protocol: str) -> list[int]:
        if request.prompt_token_ids is not None:
            return list(request.prompt_token_ids)
        started = time.perf_counter()
        if request.chat is not None:
            prompt_ids = self.tokenizer.chat_ids(request.chat)
        else:
            assert request.prompt is not None
            prompt_ids = self.tokenizer.encode(request.prompt)
        self.metrics.tokenize_seconds.labels(protocol).observe(time.perf_counter() - started)
        return prompt_ids

    async def _prepare(self, request: TextRequest, protocol: str) -> EngineRequest:
        """Validate, tokenize and size the request; ValueError/ServiceError on bad input."""
        validate_request(request)
        limits = self._engine.require_limits()
        validate_vocab_fields(request, limits.vocab_size)
        prompt_ids = await self._tokenize_input(request, protocol)
        if not prompt_ids:
            raise ValueError("prompt tokenizes to 0 tokens; it must hold at least 1 token")
        max_new_tokens = resolve_max_new_tokens(request.max_new_tokens, len(prompt_ids),
                                                limits.max_model_len,
                                                self.config.default_max_new_tokens)
        check_min_tokens(request.min_tokens, max_new_tokens)
        if request.response_format is not None:  # the engine compiles it: ValueError if bad
            await self._source.check_response_format(request.response_format)
        return EngineRequest(
            request_id=self._engine_request_id(request.request_id), prompt_token_ids=prompt_ids,
            sampling=request.sampling, max_new_tokens=max_new_tokens,
            stop_token_ids=request.stop_token_ids, ignore_eos=request.ignore_eos,
            top_logprobs=request.top_logprobs, logit_bias=dict(request.logit_bias),
            min_tokens=request.min_tokens, response_format=request.response_format, n=request.n)

    def _engine_request_id(self, public_id: str) -> str:
        """The id the engines see: the client's (cut short) + @ + this front's tag and a
        counter. Clients may reuse ids at will; the public id is still echoed to them."""
        serial = next(self._engine_ids)
        return f"{public_id[:ENGINE_ID_PUBLIC_CHARS]}@{self._engine_id_tag}{serial:x}"

    # ---- tokenizer and model info --------------------------------------------------------------
    async def tokenize(self, text: str, add_special_tokens: bool | None, protocol: str
                       ) -> list[int]:
        """Text -> ids (a worker thread for long texts)."""
        started = time.perf_counter()
        if len(text) > THREAD_TOKENIZE_CHARS:  # keep the event loop responsive
            token_ids = await asyncio.to_thread(self.tokenizer.encode, text,
                                                add_special_tokens=add_special_tokens)
        else:
            token_ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        self.metrics.tokenize_seconds.labels(protocol).observe(time.perf_counter() - started)
        return token_ids

    async def prompt_ids(self, request: TextRequest, protocol: str) -> list[int]:
        """The ids Generate would send the engine for this prompt or chat (input validated)."""
        validate_input(request)
        return await self._tokenize_input(request, protocol)

    async def detokenize(self, token_ids: list[int], skip_special_tokens: bool) -> str:
        """Ids -> text; ValueError names the first id outside the vocabulary."""
        validate_token_ids("token_ids", token_ids, self.tokenizer.vocab_size)
        # Ids whose bytes are not valid UTF-8 (e.g. a lone byte token) decode to U+FFFD.
        if len(token_ids) > THREAD_TOKENIZE_CHARS:
            return await asyncio.to_thread(self.tokenizer.decode, token_ids,
                                           skip_special_tokens=skip_special_tokens)
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    @property
    def known_limits(self) -> EngineLimits | None:
        """The engine's limits when known (None until GetInfo has succeeded)."""
        return self._engine.limits

    def limits(self) -> EngineLimits:
        """The engine's limits; ServiceError UNAVAILABLE until its info has been loaded."""
        return self._engine.require_limits()

    def check_model(self, name: str) -> None:
        """ServiceError NOT_FOUND unless `name` is the model this service serves (not checked
        while the engine is unknown: the request then fails with UNAVAILABLE)."""
        if self._engine.limits is not None and name not in (self.model_name,
                                                             self.tokenizer.name):
            raise ServiceError(grpc.StatusCode.NOT_FOUND,
                               f"model {name!r} does not exist: this server serves "
                               f"{self.model_name!r}")

    @property
    def model_name(self) -> str:
        """The served model's name: the engine's, else the tokenizer directory's."""
        limits = self._engine.limits
        return (limits.model if limits is not None and limits.model else self.tokenizer.name)

    @property
    def eos_token_ids(self) -> list[int]:
        limits = self._engine.limits
        return (limits.eos_token_ids if limits is not None and limits.eos_token_ids
                else self.tokenizer.eos_token_ids)
