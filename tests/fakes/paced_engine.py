"""A fake llmserve.v1.Engine paced like a real one, for scale-out benchmarks past what a 2-core
machine can run for real: continuous batching in time (each step sleeps base + per prefilled
token + per decoding row, up to max_num_seqs rows), a block-level prefix cache (16-token blocks,
LRU, so prefix-aware routing shows in cached_prompt_tokens) and deterministic token ids.
It uses no CPU while "computing", so N of them scale like N engines on N devices would.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import signal
from collections import OrderedDict
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from llmserve.v1 import engine_pb2, engine_pb2_grpc, generate_pb2

BLOCK = 16


@dataclass(slots=True)
class Pace:
    """Step timing of the simulated device, and its limits."""

    step_base_s: float = 0.004
    prefill_token_s: float = 0.00005
    decode_row_s: float = 0.0002
    max_num_seqs: int = 32
    cache_blocks: int = 2048


@dataclass(slots=True)
class _Seq:
    request: engine_pb2.EngineGenerateRequest
    queue: asyncio.Queue
    to_prefill: int
    cached: int
    sent: int = 0


@dataclass
class _Stats:
    steps: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    busy_s: float = 0.0


class PacedEngine(engine_pb2_grpc.EngineServicer):
    """The fake engine: Generate streams one token per step per request."""

    def __init__(self, pace: Pace | None = None, vocab_size: int = 49152,
                 eos_token_ids: tuple[int, ...] = (2,), model: str = "paced-fake") -> None:
        self.pace = pace or Pace()
        self.vocab_size, self.eos_token_ids, self.model = vocab_size, list(eos_token_ids), model
        self.stats = _Stats()
        self._cache: OrderedDict[bytes, None] = OrderedDict()
        self._waiting: list[_Seq] = []
        self._running: list[_Seq] = []
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None

    # ---- prefix cache ---------------------------------------------------------------------------
    def _blocks(self, ids: list[int]) -> list[bytes]:
        keys, digest = [], hashlib.blake2b(digest_size=16)
        for start in range(0, len(ids) - len(ids) % BLOCK, BLOCK):
            digest.update(b"".join(t.to_bytes(4, "little") for t in ids[start:start + BLOCK]))
            keys.append(digest.copy().digest())
        return keys

    def _match_and_insert(self, ids: list[int]) -> int:
        hit, keys = 0, self._blocks(ids[:-1])
        for key in keys:
            if key not in self._cache:
                break
            self._cache.move_to_end(key)
            hit += BLOCK
        for key in keys:
            self._cache[key] = None
            self._cache.move_to_end(key)
        while len(self._cache) > self.pace.cache_blocks:
            self._cache.popitem(last=False)
        return hit

    # ---- the "device" ---------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            if not self._waiting and not self._running:
                self._wake.clear()
                await self._wake.wait()
            while self._waiting and len(self._running) < self.pace.max_num_seqs:
                self._running.append(self._waiting.pop(0))
            prefill = sum(s.to_prefill for s in self._running)
            duration = (self.pace.step_base_s + prefill * self.pace.prefill_token_s
                        + len(self._running) * self.pace.decode_row_s)
            await asyncio.sleep(duration)
            self.stats.steps += 1
            self.stats.busy_s += duration
            for seq in list(self._running):
                seq.to_prefill = 0
                self._emit(seq)

    def _emit(self, seq: _Seq) -> None:
        request = seq.request
        token = (len(request.prompt_token_ids) * 31 + seq.sent * 7919 + 11) % self.vocab_size
        token = token if token not in self.eos_token_ids else token + 1
        seq.sent += 1
        message = engine_pb2.EngineGenerateResponse(token_ids=[token])
        if seq.sent >= request.max_new_tokens:
            message.finish_reason = generate_pb2.FINISH_REASON_LENGTH
            message.usage.prompt_tokens = len(request.prompt_token_ids)
            message.usage.completion_tokens = seq.sent
            message.usage.cached_prompt_tokens = seq.cached
            self._running.remove(seq)
        seq.queue.put_nowait(message)

    # ---- rpcs -----------------------------------------------------------------------------------
    async def Generate(self, request, context):
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._run())
        ids = list(request.prompt_token_ids)
        cached = self._match_and_insert(ids)
        self.stats.requests += 1
        self.stats.prompt_tokens += len(ids)
        self.stats.cached_tokens += cached
        seq = _Seq(request, asyncio.Queue(), len(ids) - cached, cached)
        self._waiting.append(seq)
        self._wake.set()
        try:
            while True:
                message = await seq.queue.get()
                yield message
                if message.finish_reason:
                    return
        finally:
            for pool in (self._waiting, self._running):
                if seq in pool:
                    pool.remove(seq)

    async def Abort(self, request, context):
        return engine_pb2.AbortResponse(found=False)

    async def GetInfo(self, request, context):
        return engine_pb2.EngineInfo(
            model=self.model, dtype="bfloat16", device="fake", backend="paced",
            max_model_len=4096, kv_pool_capacity_tokens=self.pace.cache_blocks * BLOCK,
            vocab_size=self.vocab_size, eos_token_ids=self.eos_token_ids)


async def serve_paced(engine: PacedEngine, port: int = 0) -> tuple[grpc.aio.Server, int]:
    """Start the fake on 127.0.0.1 (SERVING); returns the server and its port."""
    server = grpc.aio.server()
    engine_pb2_grpc.add_EngineServicer_to_server(engine, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, bound


async def _main(ports: list[int], pace: Pace, vocab_size: int, eos: tuple[int, ...]) -> None:
    servers = [await serve_paced(PacedEngine(pace, vocab_size, eos), port) for port in ports]
    print("paced engines serving on " + ",".join(f"127.0.0.1:{p}" for _, p in servers),
          flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    await stop.wait()
    await asyncio.gather(*(server.stop(0) for server, _ in servers))


if __name__ == "__main__":   # python -m tests.fakes.paced_engine --ports 50061,50062
    parser = argparse.ArgumentParser(description="paced fake engines, one per port")
    parser.add_argument("--ports", required=True)
    parser.add_argument("--vocab-size", type=int, default=49152)
    parser.add_argument("--eos", type=int, nargs="*", default=[2])
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--step-ms", type=float, default=4.0, help="fixed time of every step")
    args = parser.parse_args()
    pace = Pace(step_base_s=args.step_ms / 1000, max_num_seqs=args.max_num_seqs)
    asyncio.run(_main([int(p) for p in args.ports.split(",")], pace, args.vocab_size,
                      tuple(args.eos)))
