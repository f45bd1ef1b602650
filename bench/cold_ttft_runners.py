"""The timed sides of bench/cold_ttft.py: services over gRPC (cold and prefix-cached first
tokens) and one transformers forward, repeat by repeat."""
from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.cold_ttft import engine_configs
from bench.common import OtherLoad, Services, wait_for_quiet


@dataclass(slots=True)
class Run:
    """Every side's seconds per repeat and what each gRPC request reported."""

    seconds: dict[str, list[float]] = field(default_factory=dict)
    prompt_tokens: list[int] = field(default_factory=list)
    cached_tokens: dict[str, list[int]] = field(default_factory=dict)
    others_cores: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, side: str, seconds: float) -> None:
        self.seconds.setdefault(side, []).append(seconds)

    def extend(self, other: "Run") -> None:
        """Append another run's repeats to this one's."""
        for side, values in other.seconds.items():
            self.seconds.setdefault(side, []).extend(values)
        for side, values in other.cached_tokens.items():
            self.cached_tokens.setdefault(side, []).extend(values)
        self.prompt_tokens += other.prompt_tokens
        self.others_cores += other.others_cores
        self.notes += other.notes


class ServiceClient:
    """One gRPC channel to a service's public address, on a loop kept for the whole run."""

    def __init__(self, runner: asyncio.Runner, address: str) -> None:
        import grpc

        from llmserve.v1 import generate_pb2_grpc as pb_grpc

        self.runner = runner
        self.channel = runner.run(self._open(grpc, address))
        self.stub = pb_grpc.TextGenerationStub(self.channel)

    @staticmethod
    async def _open(grpc, address: str):
        return grpc.aio.insecure_channel(address)

    def tokenize(self, text: str) -> list[int]:
        from llmserve.v1 import generate_pb2 as pb

        async def call() -> list[int]:
            reply = await self.stub.Tokenize(pb.TokenizeRequest(text=text), timeout=60)
            return list(reply.token_ids)

        return self.runner.run(call())

    def first_token(self, text: str):
        """One Generate of one token: the bench/serve.py record (ttft_s, cached tokens)."""
        from bench.serve import LoadSpec, Prompt, send_one

        record = self.runner.run(send_one(self.stub, Prompt(text, 0), LoadSpec(1, output_len=1),
                                          0))
        if record.error or not record.token_ids:
            raise RuntimeError(f"Generate failed: {record.error or 'no token'}")
        return record

    def close(self) -> None:
        self.runner.run(self.channel.close())


def hf_forward(model, ids: list[int], last_only: bool) -> float:
    """Seconds of one transformers forward over ids (no generate, no cache kept)."""
    import torch

    input_ids = torch.tensor([ids])  # [1, tokens]
    extra = {"logits_to_keep": 1} if last_only else {}
    with torch.inference_mode():
        start = time.perf_counter()
        model(input_ids=input_ids, use_cache=False, **extra)
        return time.perf_counter() - start


def one_repeat(clients: dict[str, ServiceClient], model, text: str, run: Run,
               reverse: bool = False) -> None:
    """Every side once on this window: each engine cold, then cached, then transformers; with
    `reverse`, transformers first and the engines in reverse order (so that no side always
    runs first or last)."""
    ids = next(iter(clients.values())).tokenize(text)
    run.prompt_tokens.append(len(ids))
    with OtherLoad() as load:
        if reverse:
            _transformers(model, ids, run)
        for label, client in (reversed(clients.items()) if reverse else clients.items()):
            for side in ("cold", "cached"):
                record = client.first_token(text)
                run.add(f"{side}{label}", record.ttft_s)
                run.cached_tokens.setdefault(f"{side}{label}", []).append(
                    record.cached_prompt_tokens)
                if side == "cold" and record.cached_prompt_tokens:
                    run.notes.append(f"cold{label}: {record.cached_prompt_tokens} prompt tokens "
                                     "were cached")
                if record.prompt_tokens != len(ids):
                    run.notes.append(f"{side}{label}: the engine saw {record.prompt_tokens} "
                                     f"prompt tokens, Tokenize gave {len(ids)}")
        if not reverse:
            _transformers(model, ids, run)
    run.others_cores.append(load.others_cores)


def _transformers(model, ids: list[int], run: Run) -> None:
    if model is not None:
        run.add("hf_forward", hf_forward(model, ids, last_only=False))
        run.add("hf_last", hf_forward(model, ids, last_only=True))


def start_services(args: argparse.Namespace, chunk: int, variant: tuple[str, str] | None,
                   log_dir: Path) -> Services:
    """Engine + tokenizer service at this chunk size, with `variant` set in their
    environment (only theirs)."""
    # a fixed team, as transformers has here: the sides take turns, so the engine's thread
    # governor would count the other sides as busy neighbours and run the next prefill on one
    # thread (--engine-args=--adaptive-threads puts it back)
    engine_args = ["--dtype", "bfloat16", "--max-model-len", str(args.max_model_len),
                   "--max-num-batched-tokens", str(chunk), "--no-adaptive-threads",
                   *args.engine_args]
    if variant is None:
        return Services(args.model, engine_args, args.threads, log_dir)
    name, value = variant
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        return Services(args.model, engine_args, args.threads, log_dir)
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def timed_repeats(args: argparse.Namespace, clients: dict[str, ServiceClient], model,
                  windows: list[str]) -> Run:
    """--repeats repeats on windows[1:]; with --max-others, each after waiting for an idle
    machine and, while others kept more than that busy, again on the next window (at most
    --retries times; a window the engines have seen is no longer cold)."""
    run, unused = Run(), iter(windows[1:])
    for index in range(1, args.repeats + 1):
        for attempt in range(args.retries + 1):
            if args.max_others is not None:
                wait_for_quiet(args.quiet_wait)
            trial = Run()
            one_repeat(clients, model, next(unused), trial, reverse=index % 2 == 0)
            print(f"  repeat {index}: " + "  ".join(
                f"{side} {values[-1] * 1e3:7.0f} ms" for side, values in trial.seconds.items())
                  + f"  (others {trial.others_cores[-1]:.2f} cores)", flush=True)
            if (args.max_others is None or trial.others_cores[-1] <= args.max_others
                    or attempt == args.retries):
                break
            print(f"  repeat {index}: other processes were busy; measuring again", flush=True)
        run.extend(trial)
    return run


def measure(args: argparse.Namespace, windows: list[str]) -> Run:
    """Start the services (one per chunk size and variant), warm every side on windows[0],
    then the timed repeats."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    model = None if args.no_hf else AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.bfloat16).eval()
    log_dir = Path(tempfile.mkdtemp(prefix="llmserve-cold-ttft-"))
    services: list[Services] = []
    with asyncio.Runner() as runner:
        try:
            clients: dict[str, ServiceClient] = {}
            for label, chunk, variant in engine_configs(args.chunk_sizes, args.env_variants):
                services.append(start_services(args, chunk, variant, log_dir))
                clients[label] = ServiceClient(runner, services[-1].address)
            one_repeat(clients, model, windows[0], Run())   # warm-up, not kept
            run = timed_repeats(args, clients, model, windows)
            for client in clients.values():
                client.close()
        finally:
            for service in services:
                service.close()
    return run
