"""The engine thread: runs `engine.step()` in a loop and routes each request's outputs to its
asyncio queue on the event loop. No gRPC here (server.py is the edge).

Each open stream owns one asyncio queue (`open_stream`); the loop puts every `RequestOutput`
for that request into it as soon as a step samples it (held N at a time with a stream interval,
see stream_interval.py), and `None` into every queue if the loop crashes.

The loop also publishes a heartbeat (`progress()`: when the last step finished, and the step in
progress) that server.py judges with liveness.LivenessWatch. Fault injection for tests: with
LLMSERVE_FAULT_STALL_FILE set, every step blocks (after scheduling) while that file exists.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from engine_svc.engine import LLMEngine, RequestOutput
from engine_svc.liveness import Progress
from engine_svc.metrics import EngineMetrics
from engine_svc.params import SamplingParams, StoppingParams
from engine_svc.stream_interval import StreamCoalescer

log = logging.getLogger("engine_svc")
STALL_FILE_ENV = "LLMSERVE_FAULT_STALL_FILE"   # fault injection (tests only): see the docstring


class EngineLoop:
    """Runs `engine.step()` on a background thread and routes outputs to asyncio queues."""

    def __init__(self, engine: LLMEngine, metrics: EngineMetrics,
                 loop: asyncio.AbstractEventLoop,
                 on_crash: Callable[[], None] | None = None,
                 engine_thread: ThreadPoolExecutor | None = None,
                 stream_interval: int = 1) -> None:
        """on_crash runs on the asyncio loop after a crash has failed every open stream.

        engine_thread: the one-worker executor the engine was built on. Steps then run on the
        thread that loaded the weights: torch's OpenMP team belongs to the thread that first
        used it, and a second team on a 2-core CPU left a core idle (~25% slower decode).
        """
        self.engine = engine
        self.metrics = metrics
        self.loop = loop
        self.on_crash = on_crash
        self.queues: dict[str, asyncio.Queue] = {}   # request_id -> its stream's outputs
        # tokens are held here, on the engine thread, so a step with nothing to send does not
        # wake the event loop at all
        self.coalescer = StreamCoalescer(stream_interval)
        self._stop = threading.Event()
        self._engine_thread = engine_thread or ThreadPoolExecutor(1, "engine-loop")
        self._running: Future | None = None
        self.error: BaseException | None = None
        self.heartbeat = time.monotonic()   # when the last step finished (engine thread writes)
        stall_file = os.environ.get(STALL_FILE_ENV)
        if stall_file:
            log.warning("fault injection: steps block while %s exists (%s)", stall_file,
                        STALL_FILE_ENV)
            engine.fault_hook = lambda: _wait_while_exists(stall_file)

    # ---- streams (event-loop side) ------------------------------------------------------------
    def has_stream(self, request_id: str) -> bool:
        return request_id in self.queues

    def open_stream(self, request_id: str) -> asyncio.Queue:
        """The queue this request's outputs will arrive on (None: the loop crashed)."""
        queue: asyncio.Queue = asyncio.Queue()
        self.queues[request_id] = queue
        return queue

    def close_stream(self, request_id: str) -> None:
        self.queues.pop(request_id, None)

    async def warm_up(self) -> None:
        """One tiny request through the loop so the first real request pays no compile/alloc
        cost; the prefix cache is cleared after it."""
        request_id = f"warmup-{uuid.uuid4().hex}"
        queue = self.open_stream(request_id)
        self.engine.add_request(request_id, [0, 1, 2, 3], SamplingParams(temperature=0.0),
                                StoppingParams(max_new_tokens=2, ignore_eos=True))
        while True:
            out = await queue.get()
            if out is None or out.finished:
                break
        self.close_stream(request_id)
        self.engine.clear_prefix_cache()

    # ---- the thread ---------------------------------------------------------------------------
    def start(self) -> None:
        self._running = self._engine_thread.submit(self._run)

    def stop(self) -> None:
        self._stop.set()
        if self._running is not None:
            try:
                self._running.result(timeout=10)
            except TimeoutError:
                log.warning("engine loop did not stop within 10 s")

    def progress(self) -> Progress:
        """A snapshot of the loop's progress, for the liveness watch (any thread)."""
        scheduler = self.engine.scheduler
        return Progress(self.heartbeat, len(scheduler.waiting), len(scheduler.running),
                        self.engine.current_step)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.engine.wait_for_work(timeout=0.05)
                outputs = self.engine.step()
                self.metrics.record_step(outputs)
                self._hand_over(self.coalescer.push(outputs))
                # a beat proves progress: a step that computed something, or nothing to compute
                if self.engine.last_step.batch_size or not self.engine.scheduler.has_work():
                    self.heartbeat = time.monotonic()
            self._hand_over(self.coalescer.flush())
        except BaseException as err:  # a crash here must not leave streams hanging
            log.exception("engine loop crashed")
            self.error = err
            self.loop.call_soon_threadsafe(self._fail_all)

    def _hand_over(self, outputs: list[RequestOutput]) -> None:
        """From the engine thread: route outputs on the event loop (none: leave it asleep)."""
        if outputs:
            self.loop.call_soon_threadsafe(self._dispatch, outputs)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            queue = self.queues.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)

    def _fail_all(self) -> None:
        for queue in self.queues.values():
            queue.put_nowait(None)
        if self.on_crash is not None:
            self.on_crash()


def _wait_while_exists(path: str) -> None:
    """The fault hook behind STALL_FILE_ENV: block the engine thread while `path` exists."""
    while os.path.exists(path):
        time.sleep(0.01)
