"""Scale-out benchmark: one tokenizer service in front of N engines.

    .venv/bin/python bench/scale_out.py --real-engines 1 2 --fake-engines 1 2 4 8 \\
        --json bench/results/scale_out_cpu.json

For each N it reports requests/s and TTFT (p50/p99) through the front, and the prefix-cache hit
ratio of a workload with shared system prompts under --routing prefix and round-robin, as a
fraction of the ideal (every request but the first of its system prompt reuses the longest
prefix it shares with an earlier one). Real engines (fp32, one thread each) for N <= 2; past
that the paced fake engine of tests/fakes (continuous batching in time, block prefix cache, no
CPU while it "computes"). Router overhead per decision (prefix key + ranking + load bound) in
microseconds, p50/p99, at several pool sizes. A shared, noisy machine moves these numbers:
compare the columns of one run, not runs.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import REPO_ROOT, free_port, machine_info, summarize_ms  # noqa: E402
from tests.e2e.cluster import ENGINE_EXTRA, stream, text_request  # noqa: E402
from tests.reliability.harness import engine_proc, tokenizer_proc  # noqa: E402
from tokenizer_svc.router import Router, RouterConfig  # noqa: E402
from tokenizer_svc.schema import ChatTurn  # noqa: E402
from tokenizer_svc.tokenizer import ModelTokenizer  # noqa: E402

DEFAULT_MODEL = REPO_ROOT / "models" / "smollm2-135m-instruct"


def system_workload(topics: int, per_topic: int, salt: str, seed: int = 0
                    ) -> list[list[tuple[str, str]]]:
    """`per_topic` chats for each of `topics` ~230-token system prompts; each system prompt's
    first request comes first, the rest shuffled."""
    chats = []
    for t in range(topics):
        system = (f"[{salt}] You are assistant {t} of the museum. " + " ".join(
            f"Rule {k}: answer questions about exhibit {t} briefly and with one concrete fact."
            for k in range(12)))
        chats.append([[("system", system), ("user", f"Question {q}?")] for q in range(per_topic)])
    rest = [c for chat in chats for c in chat[1:]]
    random.Random(seed).shuffle(rest)
    return [chat[0] for chat in chats] + rest


def ideal_cached(tokenizer: ModelTokenizer, chats) -> int:
    seen: list[list[int]] = []
    total = 0
    for chat in chats:
        ids = tokenizer.chat_ids([ChatTurn(r, c) for r, c in chat])
        total += max((_common(ids, other) for other in seen), default=0)
        seen.append(ids)
    return total


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) - 1 and a[n] == b[n]:
        n += 1
    return n


async def run_workload(address: str, chats, concurrency: int, new_tokens: int) -> dict:
    """First request of each system prompt together, then the rest `concurrency` at a time."""
    import grpc

    from llmserve.v1 import generate_pb2_grpc

    topics = len({c[0][1] for c in chats})
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generate_pb2_grpc.TextGenerationStub(channel)
        gate = asyncio.Semaphore(concurrency)

        async def one(chat):
            async with gate:
                return await stream(stub, text_request(chat=chat, max_new_tokens=new_tokens))
        started = time.perf_counter()
        results = list(await asyncio.gather(*(one(c) for c in chats[:topics])))
        results += await asyncio.gather(*(one(c) for c in chats[topics:]))
        elapsed = time.perf_counter() - started
    failed = [r.details for r in results if r.usage is None]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed: {failed[:3]}")
    return {"requests": len(results), "seconds": round(elapsed, 3),
            "requests_per_s": round(len(results) / elapsed, 2),
            "ttft_ms": summarize_ms([r.first_token_s for r in results]),
            "cached_tokens": sum(r.usage.cached_prompt_tokens for r in results)}


def router_overhead(tokenizer: ModelTokenizer, sizes: list[int], decisions: int) -> list[dict]:
    """Microseconds per Router.choose (prefix mode) for a ~230-token prompt."""
    prompt = tokenizer.chat_ids([ChatTurn(r, c) for r, c in system_workload(1, 1, "r")[0]])
    rng = random.Random(0)
    rows = []
    for size in sizes:
        router = Router(RouterConfig())
        engines = [f"10.1.{i // 250}.{i % 250}:50052" for i in range(size)]
        loads = [{e: rng.randrange(0, 8) for e in engines} for _ in range(64)]
        times = []
        for i in range(decisions):
            ids = prompt[:-1] + [i % 4000]
            begin = time.perf_counter_ns()
            router.choose(ids, loads[i % 64])
            times.append((time.perf_counter_ns() - begin) / 1000)
        rows.append({"engines": size, "p50_us": round(float(np.percentile(times, 50)), 1),
                     "p99_us": round(float(np.percentile(times, 99)), 1)})
        print(f"router overhead, {size:3d} engines: p50 {rows[-1]['p50_us']} us, "
              f"p99 {rows[-1]['p99_us']} us", flush=True)
    return rows


def start_engines(kind: str, count: int, model: Path, logs: Path,
                  step_ms: float) -> tuple[list, list[str]]:
    """Real engine processes, or one process serving `count` paced fakes."""
    if kind == "real":
        procs = [engine_proc(model, logs, *ENGINE_EXTRA).spawn() for _ in range(count)]
        for proc in procs:
            proc.wait_serving(timeout=300)
        return procs, [p.address for p in procs]
    ports = [free_port() for _ in range(count)]
    tokenizer = ModelTokenizer.from_pretrained(model)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.paced_engine", "--ports", ",".join(map(str, ports)),
         "--vocab-size", str(tokenizer.vocab_size), "--eos", *map(str, tokenizer.eos_token_ids),
         "--step-ms", str(step_ms)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and "serving" in proc.stdout.readline()
    return [proc], [f"127.0.0.1:{p}" for p in ports]


def stop_all(procs) -> None:
    for proc in procs:
        if hasattr(proc, "stop"):
            proc.stop(timeout=20)
        else:
            proc.terminate()
            proc.wait(timeout=20)


def measure(kind: str, count: int, args: argparse.Namespace, tokenizer: ModelTokenizer,
            logs: Path) -> dict:
    """Both routings over fresh engines each (cold caches), same workload shape."""
    row: dict = {"engines": count, "kind": kind}
    for routing in ("prefix", "round-robin"):
        procs, addresses = start_engines(kind, count, args.model, logs, args.fake_step_ms)
        front = tokenizer_proc(args.model, ",".join(addresses), logs, "--routing", routing)
        try:
            front.spawn().wait_serving(timeout=120)
            per_prompt = max(args.per_prompt, args.requests_per_engine * count
                             // args.system_prompts)
            chats = system_workload(args.system_prompts, per_prompt, f"{kind}{count}{routing}")
            result = asyncio.run(run_workload(front.address, chats,
                                              args.concurrency_per_engine * count,
                                              args.new_tokens if kind == "real"
                                              else args.fake_new_tokens))
        finally:
            front.stop(timeout=20)
            stop_all(procs)
        ideal = ideal_cached(tokenizer, chats)
        result["cache_hit_ratio_vs_ideal"] = round(result["cached_tokens"] / ideal, 3)
        row[routing] = result
        print(f"{kind:4s} x{count}: {routing:11s} {result['requests_per_s']:7.2f} req/s, TTFT "
              f"p50 {result['ttft_ms']['p50']:.0f} ms p99 {result['ttft_ms']['p99']:.0f} ms, "
              f"cache hits {result['cache_hit_ratio_vs_ideal']:.2f} of ideal", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--real-engines", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--fake-engines", type=int, nargs="*", default=[1, 2, 4, 8])
    parser.add_argument("--system-prompts", type=int, default=8)
    parser.add_argument("--per-prompt", type=int, default=8)
    parser.add_argument("--concurrency-per-engine", type=int, default=8)
    parser.add_argument("--requests-per-engine", type=int, default=32,
                        help="the workload grows with N (at least system prompts x per prompt)")
    parser.add_argument("--fake-step-ms", type=float, default=20.0,
                        help="paced fake: fixed time of a step (a large model's decode step)")
    parser.add_argument("--new-tokens", type=int, default=8, help="per request, real engines")
    parser.add_argument("--fake-new-tokens", type=int, default=32)
    parser.add_argument("--router-decisions", type=int, default=20000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if any(n > 2 for n in args.real_engines):
        parser.error("--real-engines: at most 2 on this machine; use --fake-engines past that")
    tokenizer = ModelTokenizer.from_pretrained(args.model)
    result = {"machine": machine_info(), "settings": {
        k: v for k, v in vars(args).items() if k not in ("json", "model")}}
    result["router_overhead"] = router_overhead(tokenizer, [2, 4, 8, 16, 64],
                                                args.router_decisions)
    with tempfile.TemporaryDirectory(prefix="scale-out-") as logs:
        result["throughput"] = [measure(kind, n, args, tokenizer, Path(logs))
                                for kind, counts in (("real", args.real_engines),
                                                     ("fake", args.fake_engines))
                                for n in counts]
    result["machine"]["load_average_1m_at_end"] = os.getloadavg()[0]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
