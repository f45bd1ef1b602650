"""The engine wires scheduler, KV pool, prefix cache and model runner into `step()`.

Thread model: `add_request` and `abort` may be called from any thread. `add_request` validates
and hands the request to `Scheduler.add` under the engine lock (the lock `step()` holds while it
schedules and commits, not while the forward pass runs). An abort of a running request, and a
prefix-cache clear, leave a command in an inbox that `step()` (one engine thread) drains before
scheduling.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from engine_svc.config import EngineConfig
from engine_svc.grammar import GrammarCache
from engine_svc.kv_pool import KVPool
from engine_svc.model_runner import ModelRunner
from engine_svc.params import MAX_SAMPLES, FinishReason, SamplingParams, StoppingParams
from engine_svc.prefix_cache import PrefixCache
from engine_svc.scheduler import QueueFullError, Scheduler, StepPlan
from engine_svc.sequence import Sequence, SeqStatus, make_samples
from engine_svc.model_config import ModelConfig

log = logging.getLogger(__name__)

__all__ = ["DuplicateRequestError", "LLMEngine", "QueueFullError", "RequestOutput", "StepStats"]


class DuplicateRequestError(ValueError):
    """A request id that is still queued or running was submitted again."""


@dataclass(slots=True)
class RequestOutput:
    """New tokens of one sample of a request from one step (finish_reason set on its last
    output; each of the n samples ends with its own)."""

    request_id: str
    token_ids: list[int]
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    index: int = 0                  # which of the request's n samples

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class StepStats:
    """What a step does (the current one) or did (the last one, for metrics)."""

    phase: str = "idle"           # "prefill", "decode" or "mixed"
    batch_size: int = 0
    num_tokens: int = 0
    duration_s: float = 0.0
    prompt_tokens: int = 0


class LLMEngine:
    """In-process engine: add requests, call `step()` until done, read outputs."""

    def __init__(self, config: EngineConfig) -> None:
        self.model_config = ModelConfig.from_dir(config.model)
        mc = self.model_config
        self.config = config.resolved(mc.max_position_embeddings)
        self.max_model_len = self.config.model_len
        self.runner = ModelRunner(self.config, mc)
        self.pool = KVPool(self.runner.capacity)
        self.prefix_cache = PrefixCache(self.pool) if config.enable_prefix_caching else None
        self.scheduler = Scheduler(self.config, self.pool, self.runner.table.slots,
                                   self.prefix_cache)
        self.eos_ids = frozenset(mc.eos_token_ids)
        # response_format -> compiled grammar (xgrammar loads at the first constrained request)
        self.grammars = GrammarCache(config.model, mc.vocab_size, mc.eos_token_ids)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._lock = threading.Lock()
        self._live: dict[str, list[Sequence]] = {}  # request_id -> its n samples, until all end
        self.last_step = StepStats()
        self.current_step: StepStats | None = None  # the step in progress (from its schedule on)
        # fault injection (tests): called inside each step, after scheduling, before the forward
        # pass; one that blocks wedges the engine loop there (engine_loop.py wires an env var)
        self.fault_hook: Callable[[], None] | None = None

    # ---- requests in ----------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int],
                    sampling: SamplingParams | None = None,
                    stopping: StoppingParams | None = None, n: int = 1,
                    num_generated_prompt_tokens: int = 0,
                    deadline: float | None = None) -> None:
        """Validate and queue a request for n samples of the prompt (one prefill; the samples
        share the prompt's pool rows, sample i draws with seed + i; outputs carry `index`).

        num_generated_prompt_tokens: the prompt's last N ids were generated (a request resumed
        after failover: penalties count them as output). deadline: time.monotonic() after which
        the request is dropped (ABORTED) instead of computed.

        Raises ValueError (bad input), DuplicateRequestError (id in flight) or QueueFullError.
        """
        sampling = sampling or SamplingParams()
        stopping = stopping or StoppingParams()
        self._validate(request_id, prompt_ids, sampling, stopping, n)
        if not 0 <= num_generated_prompt_tokens < len(prompt_ids):
            raise ValueError(f"num_generated_prompt_tokens must be in [0, {len(prompt_ids)}) "
                             f"(the prompt's length), got {num_generated_prompt_tokens}")
        if sampling.response_format is not None:  # ValueError naming the field if it won't compile
            sampling = replace(sampling,
                               response_format=self.grammars.prepare(sampling.response_format))
        seq = Sequence(request_id, list(prompt_ids), sampling, stopping, deadline=deadline,
                       num_generated_prompt_tokens=num_generated_prompt_tokens)
        if stopping.min_tokens:
            eos = () if stopping.ignore_eos else self.eos_ids
            seq.stop_ids_banned = tuple(sorted(set(stopping.stop_token_ids) | set(eos)))
        samples = make_samples(seq, n)
        with self._lock:
            if request_id in self._live:
                raise DuplicateRequestError(f"request_id {request_id!r} is already in flight")
            self.scheduler.add(seq)      # raises QueueFullError at the queue limit
            self._live[request_id] = samples
        self._wakeup.set()

    def abort(self, request_id: str, index: int | None = None) -> None:
        """Abort a request, or only its sample `index` (no-op for what already ended); rows
        are freed at the next step, and each aborted sample ends with an ABORTED output.

        A waiting sample leaves the queue at once (its place is free for the next one); a
        running one is finished by the engine thread, which may be computing it right now.
        """
        with self._lock:
            samples = self._live.get(request_id)
            if samples is None:
                return
            for seq in samples if index is None else samples[index:index + 1]:
                if seq.abort_requested or seq.status is SeqStatus.FINISHED:
                    continue
                seq.abort_requested = True
                if seq.status is not SeqStatus.RUNNING:
                    self.scheduler.finish(seq, FinishReason.ABORTED)
                self._inbox.put(("abort", seq))
            if all(s.abort_requested or s.status is SeqStatus.FINISHED for s in samples):
                del self._live[request_id]   # the id is free for a new request at once
        self._wakeup.set()

    def is_live(self, request_id: str) -> bool:
        """True while the request is queued or running."""
        return request_id in self._live

    def rows_held_by_requests(self) -> int:
        """Pool rows that queued/running requests hold (cache-only rows are reclaimable).

        Distinct requests share rows only through the prefix cache, so every row with two or
        more references is in the tree, and the tree holds one reference per row it caches.
        Forked samples (n > 1) share their prompt outside it too: then count the rows held.
        """
        if self.prefix_cache is None:
            return self.pool.num_used
        running = self.scheduler.running
        if any(seq.index for seq in running):
            return int(np.unique(np.concatenate([seq.rows for seq in running])).size)
        return self.pool.num_used - self.prefix_cache.num_cached_tokens + self.pool.num_shared

    def clear_prefix_cache(self) -> None:
        """Drop every prefix-cache reference at the next step (rows in use stay in use)."""
        self._inbox.put(("clear_cache", None))
        self._wakeup.set()

    def _validate(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams,
                  stopping: StoppingParams, n: int) -> None:
        if not request_id:
            raise ValueError("request_id must not be empty")
        if not 1 <= n <= MAX_SAMPLES:
            raise ValueError(f"n must be in [1, {MAX_SAMPLES}], got {n}")
        if n > self.config.max_num_seqs:
            raise ValueError(f"n ({n}) must be <= max_num_seqs ({self.config.max_num_seqs}): "
                             "the samples run side by side")
        if not prompt_ids:
            raise ValueError("prompt_token_ids must hold at least 1 token")
        vocab = self.model_config.vocab_size
        bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt_token_ids entries must be in [0, {vocab}), got {bad}")
        sampling.validate(vocab)
        stopping.validate(vocab, self.max_model_len)
        if len(prompt_ids) + stopping.max_new_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({stopping.max_new_tokens}) "
                f"exceeds max_model_len ({self.max_model_len})")

    # ---- the loop ----------------------------------------------------------------------------
    def has_work(self) -> bool:
        return self.scheduler.has_work() or not self._inbox.empty()

    def wait_for_work(self, timeout: float) -> None:
        """Block until a command arrives (or timeout) when there is nothing to run."""
        if self.scheduler.has_work() or not self._inbox.empty():
            return
        self.runner.idle()
        self._wakeup.wait(timeout)
        self._wakeup.clear()   # commands are queued before the event is set: none is missed

    def step(self) -> list[RequestOutput]:
        """Drain commands, run one forward pass, return every request's new tokens."""
        outputs = self._drain_inbox()
        with self._lock:
            plan = self.scheduler.schedule()
            outputs.extend(self._final(seq, []) for seq in plan.expired)
        if not plan.chunks:
            self.last_step = StepStats()
            return outputs
        started = time.perf_counter()
        step = self.current_step = StepStats(
            phase="decode" if not plan.prefill else ("prefill" if not plan.decode else "mixed"),
            batch_size=len(plan.chunks), num_tokens=plan.num_tokens,
            prompt_tokens=sum(c.num_tokens for c in plan.prefill))
        if self.fault_hook is not None:
            self.fault_hook()
        sampled = self.runner.execute(plan)
        with self._lock:
            self.scheduler.commit(plan)
            outputs.extend(self._process(plan, sampled))
        step.duration_s = time.perf_counter() - started
        self.last_step, self.current_step = step, None
        return outputs

    def _drain_inbox(self) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return outputs
            with self._lock:
                if kind == "clear_cache":
                    if self.prefix_cache is not None:
                        self.prefix_cache.clear()
                elif kind == "abort":
                    if item.status is not SeqStatus.FINISHED:   # running: finish it now
                        self.scheduler.finish(item, FinishReason.ABORTED)
                    if item.finish_reason is FinishReason.ABORTED:  # else it ended on its own
                        outputs.append(self._final(item, []))

    def _process(self, plan: StepPlan, sampled) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        sampled_chunks = plan.sampled   # the runner's order: forks after their chunk
        if sampled is None or not sampled_chunks:
            return outputs
        token_ids = sampled.token_ids.tolist()
        logprobs = sampled.logprobs.tolist() if sampled.logprobs is not None else None
        top_ids = sampled.top_ids.tolist() if sampled.top_ids is not None else None
        top_lps = sampled.top_logprobs.tolist() if sampled.top_logprobs is not None else None
        now = time.monotonic()
        for i, chunk in enumerate(sampled_chunks):
            seq = chunk.seq
            if seq.status is not SeqStatus.RUNNING or seq.abort_requested:
                continue  # aborted: its rows go back when the abort is drained
            token = token_ids[i]
            if seq.grammar is not None and not seq.grammar.accept(token):
                outputs.append(self._end_off_grammar(seq, token))
                continue
            seq.output_ids.append(token)
            if seq.first_token_time is None:
                seq.first_token_time = now
            seq.last_token_time = now
            out = RequestOutput(seq.request_id, [token], index=seq.index)
            k = seq.sampling.top_logprobs
            if k and logprobs is not None and top_ids is not None:
                # only a request that asked gets logprobs: the same alone or in any batch
                out.logprobs = [logprobs[i]]
                # -inf: a token the grammar forbids (fewer than k allowed); not an alternative
                out.top_logprobs = [[(t, lp) for t, lp in zip(top_ids[i][:k], top_lps[i][:k])
                                     if lp != float("-inf")]]
            if seq.grammar is not None and seq.grammar.terminated:
                reason = FinishReason.EOS  # the grammar is complete and took its stop token (eos)
            else:
                reason = self._stop_reason(seq, token)
            if reason is not None:
                self.scheduler.finish(seq, reason)
                out = self._final(seq, out.token_ids, out)
            outputs.append(out)
        return outputs

    def _end_off_grammar(self, seq: Sequence, token: int) -> RequestOutput:
        """End a request whose sampled token its grammar forbids (dropped, not streamed). Only
        when every allowed token was banned too: min_tokens holding back the eos of a complete
        grammar ends it with EOS; anything else is a bug, logged, and ends it ABORTED."""
        assert seq.grammar is not None
        reason = FinishReason.EOS if seq.grammar.completed else FinishReason.ABORTED
        if reason is FinishReason.ABORTED:
            log.error("request %s: sampled token %d is outside its response_format grammar",
                      seq.request_id, token)
        self.scheduler.finish(seq, reason)
        return self._final(seq, [])

    def _stop_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        if len(seq.output_ids) < seq.stopping.min_tokens:  # (<= max_new_tokens: no LENGTH yet)
            return None   # eos / stop ids were masked in the sampler anyway
        if token in self.eos_ids and not seq.stopping.ignore_eos:
            return FinishReason.EOS
        if token in seq.stopping.stop_token_ids:
            return FinishReason.STOP_TOKEN
        if len(seq.output_ids) >= seq.stopping.max_new_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _final(self, seq: Sequence, token_ids: list[int],
               out: RequestOutput | None = None) -> RequestOutput:
        samples = self._live.get(seq.request_id)   # (the id may already name a newer request)
        if samples is not None and seq in samples \
                and all(s.finish_reason is not None for s in samples):
            del self._live[seq.request_id]
        out = out or RequestOutput(seq.request_id, token_ids, index=seq.index)
        out.finish_reason = seq.finish_reason
        out.prompt_tokens = len(seq.prompt_ids)
        out.completion_tokens = len(seq.output_ids)
        out.cached_prompt_tokens = seq.cached_tokens
        return out

    # ---- convenience ------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], sampling: SamplingParams | None = None,
                 stopping: StoppingParams | None = None) -> list[list[int]]:
        """Run prompts to completion together; returns each one's generated token ids."""
        ids = [f"gen-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
        for request_id, prompt in zip(ids, prompts):
            self.add_request(request_id, prompt, sampling, stopping)
        results: dict[str, list[int]] = {i: [] for i in ids}
        while self.has_work():
            for out in self.step():
                results[out.request_id].extend(out.token_ids)
        return [results[i] for i in ids]
