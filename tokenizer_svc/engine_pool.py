"""Many engines behind one front: one channel per engine, each watched with grpc.health.v1
Watch; the router picks among the usable ones; failover.py carries a request across engines.

An engine is usable while its health says SERVING and its GetInfo agrees with the model this
front serves (model name, vocabulary size, eos ids): the engines that answer at start must
agree (ValueError otherwise: the process exits with the message), and one that shows up later
serving something else is logged and never used. The front is SERVING while one engine is.
A lost engine (its Watch breaks: killed, unreachable) has its open streams cancelled at once,
so they fail over; streams on an engine that reports NOT_SERVING (draining, or its loop
stalled) keep going while they make progress, and are moved once one gets nothing for
--engine-stall-timeout seconds.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import grpc

from tokenizer_svc.config import FrontendConfig
from tokenizer_svc.engine_client import EngineClient, EngineStream
from tokenizer_svc.engine_endpoint import Endpoint, Lease, ModelIdentity
from tokenizer_svc.engine_targets import EngineTargets, resolve
from tokenizer_svc.failover import Flight
from tokenizer_svc.frontend import EngineState
from tokenizer_svc.metrics import FrontendMetrics
from tokenizer_svc.router import Router
from tokenizer_svc.schema import (EngineChunk, EngineLimits, EngineRequest, ResponseFormatSpec,
                                  ServiceError)

log = logging.getLogger("tokenizer_svc")
START_INFO_TIMEOUT_S = 2.0


class EnginePool:
    """The engines as one TokenSource: routing, health, model agreement, failover."""

    def __init__(self, targets: EngineTargets, config: FrontendConfig, router: Router,
                 metrics: FrontendMetrics, make_client: Callable[[str], EngineClient],
                 state: EngineState, on_health: Callable[[bool], Awaitable[None]]) -> None:
        """state: where the agreed model limits are published (FrontendCore reads them);
        on_health(serving) runs whenever "some engine is usable" changes."""
        self.targets = targets
        self.state = state
        self.config = config
        self.router = router
        self.metrics = metrics
        self._make_client = make_client
        self._on_health = on_health
        self.endpoints: dict[str, Endpoint] = {}
        self.identity: ModelIdentity | None = None
        self.serving = False
        self._background: set[asyncio.Task] = set()
        self._flights: dict[str, Flight] = {}
        self._resolver: asyncio.Task[None] | None = None

    # ---- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Create the endpoints, check that those answering agree on the model (ValueError
        otherwise), then watch them (and re-resolve a DNS name)."""
        addresses = list(self.targets.addresses)
        if self.targets.is_dns:
            addresses = await self._resolve() or []
        for address in addresses:
            self._add(address)
        await self._agree_at_start()
        for endpoint in self.endpoints.values():
            self._watch(endpoint)
        if self.targets.is_dns:
            self._resolver = asyncio.create_task(self._resolve_loop(), name="engine-dns")

    async def close(self) -> None:
        tasks = [t for t in [self._resolver] if t is not None]
        for endpoint in self.endpoints.values():
            tasks += [t for t in (endpoint.watch_task, endpoint.stall_task) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(e.client.close() for e in self.endpoints.values()))

    async def _agree_at_start(self) -> None:
        endpoints = list(self.endpoints.values())
        infos = await asyncio.gather(*(e.client.fetch_info(START_INFO_TIMEOUT_S)
                                       for e in endpoints), return_exceptions=True)
        answered = [(e, info) for e, info in zip(endpoints, infos)
                    if isinstance(info, EngineLimits)]
        identities = {ModelIdentity.of(info) for _, info in answered}
        if len(identities) > 1:
            raise ValueError("the engines serve different models; one front serves one model: "
                             + "; ".join(f"{e.address}: {ModelIdentity.of(info)}"
                                         for e, info in answered))
        for endpoint, info in answered:
            self._accept(endpoint, info)

    # ---- endpoints ------------------------------------------------------------------------------
    def _add(self, address: str) -> Endpoint:
        endpoint = Endpoint(address, self._make_client(address))
        self.endpoints[address] = endpoint
        self.metrics.engine_serving.labels(address).set(0)
        return endpoint

    def _remove(self, endpoint: Endpoint) -> None:
        """The address left the DNS answer: no new requests; its channel closes once idle."""
        log.info("engine at %s left %s", endpoint.address, self.targets.describe())
        endpoint.removed = True
        self.endpoints.pop(endpoint.address, None)
        for task in (endpoint.watch_task, endpoint.stall_task):
            if task is not None:
                task.cancel()
        self.metrics.forget_engine(endpoint.address)
        self._refresh()
        if not endpoint.leases:
            self._spawn(endpoint.client.close())

    def _accept(self, endpoint: Endpoint, limits: EngineLimits) -> bool:
        """Record an engine's info; False (logged, never used) when it serves another model."""
        identity = ModelIdentity.of(limits)
        if self.identity is None:
            self.identity = identity
        if identity != self.identity:
            if endpoint.mismatch != identity:
                log.error("engine at %s serves %s, not %s like the others: not used",
                          endpoint.address, identity, self.identity)
            endpoint.mismatch = identity
            return False
        endpoint.mismatch, endpoint.limits = None, limits
        return True

    def _refresh(self) -> None:
        """Recompute the agreed limits (smallest max_model_len) and this front's health."""
        known = [e.limits for e in self.endpoints.values()
                 if e.limits is not None and e.mismatch is None]
        if known:   # (none known: the last limits stay, for validation while engines restart)
            self.state.limits = dataclasses.replace(
                known[0], max_model_len=min(k.max_model_len for k in known))
        serving = any(e.usable for e in self.endpoints.values())
        if serving != self.serving:
            self.serving = serving
            self._spawn(self._on_health(serving))

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---- health -------------------------------------------------------------------------------
    def _watch(self, endpoint: Endpoint) -> None:
        endpoint.watch_task = asyncio.create_task(self._watch_loop(endpoint),
                                                  name=f"engine-health-{endpoint.address}")

    async def _watch_loop(self, endpoint: Endpoint) -> None:
        delay = self.config.engine_poll_interval_s
        while not endpoint.removed:
            lost = True
            try:
                async for serving in endpoint.client.watch_health():
                    if serving and not await self._load_info(endpoint):
                        lost = False   # it answers, GetInfo did not (yet): ask again
                        break
                    self._set_healthy(endpoint, serving, "SERVING" if serving else "NOT serving")
                    if serving:
                        delay = self.config.engine_poll_interval_s
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                    log.error("engine at %s has no grpc.health.v1 Watch", endpoint.address)
            self._set_healthy(endpoint, False, "unreachable" if lost else "not answering GetInfo")
            if lost:
                for lease in list(endpoint.leases):   # gone: move its streams now
                    lease.lose("was lost")
            await asyncio.sleep(delay)
            delay = min(delay * 2, max(self.config.engine_info_max_backoff_s, delay))

    async def _load_info(self, endpoint: Endpoint) -> bool:
        """GetInfo when an engine (re)turns SERVING: it may have restarted with other limits."""
        if endpoint.healthy and endpoint.limits is not None:
            return True
        try:
            limits = await endpoint.client.fetch_info()
        except ServiceError:
            return False
        self._accept(endpoint, limits)
        return True

    def _set_healthy(self, endpoint: Endpoint, healthy: bool, state: str) -> None:
        if healthy != endpoint.healthy:
            if healthy or endpoint.limits is not None:   # (not: "still unreachable at start")
                log.log(logging.INFO if healthy else logging.WARNING, "engine at %s is %s",
                        endpoint.address, state)
            endpoint.healthy = healthy
        if not endpoint.removed:
            self.metrics.engine_serving.labels(endpoint.address).set(int(endpoint.usable))
        if not healthy and endpoint.leases and endpoint.stall_task is None:
            endpoint.stall_task = asyncio.create_task(self._reap_stalled(endpoint))
        self._refresh()

    async def _reap_stalled(self, endpoint: Endpoint) -> None:
        """While an engine is not healthy, move streams that get nothing for the stall timeout."""
        timeout = self.config.engine_stall_timeout_s
        try:
            while not endpoint.healthy and endpoint.leases and not endpoint.removed:
                await asyncio.sleep(min(0.25, timeout / 4))
                now = time.monotonic()
                for lease in list(endpoint.leases):
                    if now - lease.last_progress > timeout:
                        lease.lose(f"sent nothing for {timeout:g} s while not serving")
        finally:
            endpoint.stall_task = None

    # ---- DNS ----------------------------------------------------------------------------------
    async def _resolve(self) -> list[str] | None:
        assert self.targets.dns_name is not None
        try:
            return await resolve(self.targets.dns_name, self.targets.dns_port)
        except OSError as error:
            log.warning("cannot resolve %s: %s", self.targets.describe(), error)
            return None

    async def _resolve_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.dns_refresh_interval_s)
            addresses = await self._resolve()
            if addresses is None:
                continue   # keep what we have
            for address in addresses:
                if address not in self.endpoints:
                    log.info("engine at %s joined %s", address, self.targets.describe())
                    self._watch(self._add(address))
            for address in set(self.endpoints) - set(addresses):
                self._remove(self.endpoints[address])

    # ---- routing (for failover.Flight) ---------------------------------------------------------
    def pick(self, prompt_ids: Sequence[int], excluded: set[str]) -> Endpoint | None:
        """The router's engine for this prompt among the usable ones not excluded; when none is
        usable, any engine not known to be bad (it answers with its own error); else None."""
        candidates = self._candidates(excluded)
        if not candidates:
            return None
        decision = self.router.choose(prompt_ids, {e.address: e.outstanding for e in candidates})
        self.metrics.routing_decisions_total.labels(decision.reason).inc()
        return self.endpoints[decision.engine]

    def _candidates(self, excluded: set[str]) -> list[Endpoint]:
        pool = [e for e in self.endpoints.values() if e.address not in excluded]
        return [e for e in pool if e.usable] or [e for e in pool if e.mismatch is None]

    @contextlib.contextmanager
    def lease(self, endpoint: Endpoint, stream: EngineStream):
        """Count a call as outstanding on the endpoint while it is open."""
        lease = Lease(stream)
        endpoint.leases.add(lease)
        self.metrics.engine_requests_total.labels(endpoint.address).inc()
        self.metrics.engine_inflight_requests.labels(endpoint.address).inc()
        try:
            yield lease
        finally:
            endpoint.leases.discard(lease)
            if not endpoint.removed:
                self.metrics.engine_inflight_requests.labels(endpoint.address).dec()
            elif not endpoint.leases:
                self._spawn(endpoint.client.close())

    def count_error(self, endpoint: Endpoint, code: grpc.StatusCode) -> None:
        if not endpoint.removed:
            self.metrics.engine_errors_total.labels(endpoint.address, code.name.lower()).inc()

    # ---- TokenSource --------------------------------------------------------------------------
    async def generate(self, request: EngineRequest,
                       timeout_s: float | None = None) -> AsyncIterator[EngineChunk]:
        """The request's chunks as one stream, whichever engines produce them."""
        flight = Flight(self, request, timeout_s)
        self._flights[request.request_id] = flight
        try:
            async with contextlib.aclosing(flight.run()) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            self._flights.pop(request.request_id, None)

    async def abort(self, request_id: str, timeout_s: float = 1.0,
                    index: int | None = None) -> bool:
        flight = self._flights.get(request_id)
        return False if flight is None else await flight.abort(index, timeout_s)

    async def check_response_format(self, spec: ResponseFormatSpec,
                                    timeout_s: float = 30.0) -> None:
        """Compile on a usable engine (another one if it is unreachable)."""
        excluded: set[str] = set()
        error: ServiceError | None = None
        while candidates := self._candidates(excluded):
            endpoint = min(candidates, key=lambda e: e.outstanding)
            try:
                return await endpoint.client.check_response_format(spec, timeout_s)
            except ServiceError as failure:
                if failure.code != grpc.StatusCode.UNAVAILABLE:
                    raise
                error = failure
                excluded.add(endpoint.address)
        raise error or ServiceError(grpc.StatusCode.UNAVAILABLE,
                                    f"no engine available at {self.targets.describe()}")
