"""Prometheus metrics of the engine service (names are the contract in DESIGN.md)."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from engine_svc.engine import LLMEngine, RequestOutput

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5,
                    2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
                0.2, 0.3, 0.5, 1.0, 2.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12)
FINISH_REASONS = ("length", "eos", "stop_sequence", "stop_token", "aborted")


class EngineMetrics:
    """Owns the engine's registry; the engine thread calls `record_step` after every step."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.registry = r = CollectorRegistry()
        self.kv_capacity = Gauge("llmserve_kv_pool_capacity_tokens",
                                 "KV pool capacity in tokens", registry=r)
        self.kv_used = Gauge("llmserve_kv_pool_used_tokens",
                             "KV pool rows held by requests (cache-only rows count as free)",
                             registry=r)
        self.kv_cached = Gauge("llmserve_prefix_cache_tokens",
                               "KV pool rows held by the prefix cache (reclaimable when "
                               "no request shares them)", registry=r)
        self.kv_usage = Gauge("llmserve_kv_pool_usage_ratio", "used / capacity", registry=r)
        self.kv_shared = Gauge("llmserve_kv_pool_shared_tokens",
                               "KV pool rows held by more than one holder", registry=r)
        self.running = Gauge("llmserve_requests_running", "requests in the running batch",
                             registry=r)
        self.waiting = Gauge("llmserve_requests_waiting", "requests in the waiting queue",
                             registry=r)
        self.prompt_tokens = Counter("llmserve_prompt_tokens",
                                     "prompt tokens prefilled (cache hits excluded)", registry=r)
        self.generation_tokens = Counter("llmserve_generation_tokens", "tokens generated",
                                         registry=r)
        self.prefix_queried = Counter("llmserve_prefix_cache_queried_tokens",
                                      "prompt tokens looked up in the prefix cache", registry=r)
        self.prefix_hit = Counter("llmserve_prefix_cache_hit_tokens",
                                  "prompt tokens served by the prefix cache", registry=r)
        self.preemptions = Counter("llmserve_preemptions", "requests preempted for KV room",
                                   registry=r)
        self.finished = Counter("llmserve_requests_finished",
                                "requests ended, by reason (each of n samples counts)",
                                ["reason"], registry=r)
        self.ttft = Histogram("llmserve_time_to_first_token_seconds", "arrival to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("llmserve_inter_token_latency_seconds", "time between tokens",
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("llmserve_e2e_request_latency_seconds", "arrival to last token",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("llmserve_batch_size", "requests per step",
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.step_duration = Histogram("llmserve_step_duration_seconds", "one forward + sample",
                                       ["phase"], buckets=_STEP_BUCKETS, registry=r)
        self.device_memory = Gauge("llmserve_device_memory_bytes", "device memory by kind",
                                   ["kind"], registry=r)
        self.stalls = Counter("llmserve_engine_stalls",
                              "times the engine loop stopped making progress: no step finished "
                              "for --stall-timeout seconds with requests pending", registry=r)
        for reason in FINISH_REASONS:
            self.finished.labels(reason=reason)
        for phase in ("prefill", "decode", "mixed"):
            self.step_duration.labels(phase=phase)
        self.kv_capacity.set(engine.pool.capacity)
        self._arrival: dict[str, float] = {}
        self._samples_left: dict[str, int] = {}             # request_id -> samples not ended
        self._last_token: dict[tuple[str, int], float] = {}  # (request_id, sample index) -> time
        self._seen_preemptions = 0
        self._seen_queried = 0
        self._seen_hit = 0
        self._memory_checked = 0.0
        self.record_step([])

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        start_http_server(port, addr=host, registry=self.registry)

    def on_request_added(self, request_id: str, n: int = 1) -> None:
        """A request for n samples arrived (its clock for TTFT and e2e latency starts)."""
        self._arrival[request_id] = time.monotonic()
        self._samples_left[request_id] = n

    def record_step(self, outputs: list[RequestOutput]) -> None:
        """Update every metric from the engine's state and one step's outputs."""
        engine, now = self.engine, time.monotonic()
        step = engine.last_step
        if step.batch_size:
            self.batch_size.observe(step.batch_size)
            self.step_duration.labels(phase=step.phase).observe(step.duration_s)
            self.prompt_tokens.inc(step.prompt_tokens)
        for out in outputs:
            self._record_output(out, now)
        self._record_pool(engine)
        if now - self._memory_checked > 1.0:
            self._memory_checked = now
            for kind, value in engine.runner.memory_stats().items():
                self.device_memory.labels(kind=kind).set(value)

    def _record_output(self, out: RequestOutput, now: float) -> None:
        arrival = self._arrival.get(out.request_id, now)
        sample = (out.request_id, out.index)
        if out.token_ids:
            self.generation_tokens.inc(len(out.token_ids))
            last = self._last_token.get(sample)
            if last is not None:
                self.itl.observe(now - last)
            elif out.index == 0:   # the samples' first tokens come from one step: count once
                self.ttft.observe(now - arrival)
            self._last_token[sample] = now
        if out.finished:
            self.finished.labels(reason=out.finish_reason.value).inc()
            self._last_token.pop(sample, None)
            left = self._samples_left.pop(out.request_id, 1) - 1
            if left > 0:
                self._samples_left[out.request_id] = left
            else:
                self.e2e.observe(now - arrival)
                self._arrival.pop(out.request_id, None)

    def _record_pool(self, engine: LLMEngine) -> None:
        pool, scheduler = engine.pool, engine.scheduler
        used = engine.rows_held_by_requests()
        self.kv_used.set(used)
        self.kv_usage.set(used / pool.capacity)
        self.kv_cached.set(engine.prefix_cache.num_cached_tokens if engine.prefix_cache else 0)
        self.kv_shared.set(pool.num_shared)
        self.running.set(len(scheduler.running))
        self.waiting.set(len(scheduler.waiting))
        self.preemptions.inc(scheduler.num_preemptions - self._seen_preemptions)
        self._seen_preemptions = scheduler.num_preemptions
        self.prefix_queried.inc(scheduler.prefix_queried_tokens - self._seen_queried)
        self._seen_queried = scheduler.prefix_queried_tokens
        self.prefix_hit.inc(scheduler.prefix_hit_tokens - self._seen_hit)
        self._seen_hit = scheduler.prefix_hit_tokens
