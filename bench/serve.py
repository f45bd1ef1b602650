"""Serving load generator over the public gRPC API (llmserve.v1.TextGeneration.Generate) and/or
the OpenAI-compatible HTTP API (/v1/completions, SSE) of the same service.

Random prompts of about --input-len tokens (random token ids, detokenized and re-tokenized by the
server until stable), exactly --output-len generated tokens each (ignore_eos), sent at a fixed
concurrency (one run per value) or as a Poisson process (--request-rate). Reports request/s,
output tokens/s, TTFT, TPOT, inter-token latency and end-to-end latency like `vllm bench serve`.

    python bench/serve.py --server 127.0.0.1:50051 --concurrency 1 4 16 32 --num-prompts 64
    python bench/serve.py --start-services --model models/smollm2-135m-instruct \\
        --protocol grpc http --concurrency 1 8      # the same load over both, side by side
    python bench/serve.py --start-services --model models/smollm2-135m-instruct \\
        --concurrency 1 4 16 32 --json bench/results/serve_cpu.json \\
        --plot bench/results/serve_cpu.png
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (OtherLoad, Services, add_quiet_machine_args, machine_info,  # noqa: E402
                          set_threads, stable_prompt_ids, wait_for_quiet)
from bench.serve_report import plot_runs, print_run, summarize_run  # noqa: E402


@dataclass(slots=True)
class Prompt:
    """One benchmark prompt: its text and its length in tokens as the server tokenizes it."""

    text: str
    num_tokens: int


@dataclass(slots=True)
class RequestRecord:
    """What one Generate call did, timed on the client."""

    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_prompt_tokens: int = 0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)   # gaps between messages after the first
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    error: str = ""


@dataclass(slots=True)
class LoadSpec:
    """How requests are sent in one run: a concurrency cap and/or a Poisson arrival rate."""

    concurrency: int | None          # None: no cap (only with a finite request rate)
    request_rate: float = math.inf   # requests per second; inf sends as fast as the cap allows
    output_len: int = 128
    temperature: float = 0.0
    seed: int = 0
    protocol: str = "grpc"           # "grpc" or "http" (OpenAI /v1/completions with SSE)
    model: str = ""                  # the served model's name (HTTP requests name it)


# ---- prompts -------------------------------------------------------------------------------------
def build_prompts(address: str, count: int, input_len: int, range_ratio: float,
                  seed: int) -> list[Prompt]:
    """Random prompts that the server tokenizes to about `input_len` tokens each."""
    import grpc

    from llmserve.v1 import generate_pb2 as pb
    from llmserve.v1 import generate_pb2_grpc as pb_grpc

    rng = np.random.default_rng(seed)
    low = max(1, int(input_len * (1 - range_ratio)))
    high = max(low, int(input_len * (1 + range_ratio)))
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.TextGenerationStub(channel)
        vocab = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30).vocab_size

        def encode(text: str) -> list[int]:
            return list(stub.Tokenize(pb.TokenizeRequest(text=text), timeout=30).token_ids)

        def decode(ids: list[int]) -> str:
            return stub.Detokenize(pb.DetokenizeRequest(token_ids=ids), timeout=30).text

        prompts = []
        for _ in range(count):
            length = int(rng.integers(low, high + 1))
            text, ids = stable_prompt_ids(encode, decode, rng, length, min(1000, vocab // 4), vocab)
            prompts.append(Prompt(text, len(ids)))
    return prompts


def served_model(address: str) -> str:
    """The model name the service reports (OpenAI requests must name it)."""
    import grpc

    from llmserve.v1 import generate_pb2 as pb
    from llmserve.v1 import generate_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as channel:
        return pb_grpc.TextGenerationStub(channel).GetModelInfo(pb.GetModelInfoRequest(),
                                                                 timeout=30).model


def read_prompt_file(path: Path, count: int) -> list[Prompt]:
    """Prompts from a text file (one per line, or a JSON list of strings), cycled to `count`."""
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        texts = json.loads(raw)
    else:
        texts = [line for line in raw.splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"--prompt-file {path} holds no prompts")
    return [Prompt(texts[i % len(texts)], 0) for i in range(count)]


# ---- one request, one run -----------------------------------------------------------------------
async def send_one(stub, prompt: Prompt, spec: LoadSpec, index: int) -> RequestRecord:
    """One streaming Generate call, timed from just before the call to the last message."""
    import grpc

    from llmserve.v1 import generate_pb2 as pb

    request = pb.GenerateRequest(prompt=prompt.text)
    request.sampling.temperature = spec.temperature
    if spec.temperature > 0:
        request.sampling.seed = spec.seed + index
    request.stopping.max_new_tokens = spec.output_len
    request.stopping.ignore_eos = True
    record = RequestRecord(prompt_tokens=prompt.num_tokens)
    start = last = time.perf_counter()
    try:
        async for message in stub.Generate(request, timeout=3600):
            now = time.perf_counter()
            if message.token_ids:
                if not record.token_ids:
                    record.ttft_s = now - start
                else:
                    record.itl_s.append(now - last)
                record.token_ids.extend(message.token_ids)
                last = now
            if message.finish_reason:
                record.finish_reason = pb.FinishReason.Name(message.finish_reason)
                record.prompt_tokens = message.usage.prompt_tokens
                record.cached_prompt_tokens = message.usage.cached_prompt_tokens
    except grpc.aio.AioRpcError as error:
        record.error = f"{error.code().name}: {error.details()}"
    record.e2e_s = time.perf_counter() - start
    record.output_tokens = len(record.token_ids)
    return record


async def send_one_http(client, url: str, prompt: Prompt, spec: LoadSpec,
                        index: int) -> RequestRecord:
    """One streamed /v1/completions call, the same request as send_one. Chunks carry text, so
    token counts come from the usage chunk and gaps between chunks stand for inter-token
    latency (a token whose text the detokenizer holds back sends no chunk)."""
    body = {"model": spec.model, "prompt": prompt.text, "max_tokens": spec.output_len,
            "temperature": spec.temperature, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    if spec.temperature > 0:
        body["seed"] = spec.seed + index
    record = RequestRecord(prompt_tokens=prompt.num_tokens)
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body, timeout=3600) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                raise RuntimeError(f"HTTP {response.status_code}: {text[:200]}")
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                now = time.perf_counter()
                chunk = json.loads(line[6:])
                _take_http_chunk(record, chunk, now - start, now - last)
                last = now if chunk["choices"] else last
    except Exception as error:  # noqa: BLE001  (a failed request is a result)
        record.error = f"{type(error).__name__}: {error}"
    record.e2e_s = time.perf_counter() - start
    return record


def _take_http_chunk(record: RequestRecord, chunk: dict, since_start: float,
                     since_last: float) -> None:
    if "error" in chunk:
        raise RuntimeError(chunk["error"].get("message"))
    for choice in chunk["choices"]:
        if choice.get("text"):
            if record.ttft_s == 0.0:
                record.ttft_s = since_start
            else:
                record.itl_s.append(since_last)
        if choice.get("finish_reason"):
            record.finish_reason = choice["finish_reason"]
    if chunk.get("usage"):
        usage = chunk["usage"]
        record.prompt_tokens = usage["prompt_tokens"]
        record.output_tokens = usage["completion_tokens"]
        record.cached_prompt_tokens = (usage.get("prompt_tokens_details") or {}).get(
            "cached_tokens", 0)


async def run_load(address: str, prompts: list[Prompt], spec: LoadSpec,
                   progress: bool = True, http_url: str = "") -> tuple[list[RequestRecord], float]:
    """Send every prompt under `spec`; return the records (prompt order) and the wall time."""
    import grpc
    import httpx2 as httpx
    from tqdm import tqdm

    from llmserve.v1 import generate_pb2_grpc as pb_grpc

    rng = np.random.default_rng(spec.seed)
    cap = asyncio.Semaphore(spec.concurrency or len(prompts))
    bar = tqdm(total=len(prompts), disable=not progress, unit="req", leave=False,
               desc=f"{spec.protocol} concurrency={spec.concurrency} rate={spec.request_rate}")
    limits = httpx.Limits(max_connections=spec.concurrency or len(prompts))
    async with grpc.aio.insecure_channel(address) as channel, \
            httpx.AsyncClient(limits=limits, timeout=3600) as client:
        stub = pb_grpc.TextGenerationStub(channel)

        async def limited(index: int, prompt: Prompt) -> RequestRecord:
            async with cap:
                if spec.protocol == "http":
                    record = await send_one_http(client, http_url + "/v1/completions", prompt,
                                                 spec, index)
                else:
                    record = await send_one(stub, prompt, spec, index)
            bar.update(1)
            return record

        start = time.perf_counter()
        tasks = []
        for index, prompt in enumerate(prompts):
            if math.isfinite(spec.request_rate) and index > 0:
                await asyncio.sleep(float(rng.exponential(1.0 / spec.request_rate)))
            tasks.append(asyncio.create_task(limited(index, prompt)))
        records = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    bar.close()
    return list(records), duration


# ---- command line -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", default="127.0.0.1:50051", metavar="HOST:PORT",
                   help="public TextGeneration address (default %(default)s); prompts are "
                        "tokenized through it for either protocol")
    p.add_argument("--http-server", default="http://127.0.0.1:8000", metavar="URL",
                   help="the same service's OpenAI HTTP API, for --protocol http "
                        "(default %(default)s)")
    p.add_argument("--protocol", nargs="+", choices=("grpc", "http"), default=["grpc"],
                   help="API(s) to send the load through; with both, every run is done over "
                        "each in turn (fresh prompts each), side by side (default grpc)")
    p.add_argument("--start-services", action="store_true",
                   help="start engine + tokenizer services on free loopback ports (needs --model)")
    p.add_argument("--model", help="model directory for --start-services")
    p.add_argument("--engine-arg", action="append", default=[], metavar="ARG",
                   help="extra engine_svc argument for --start-services (repeatable, e.g. "
                        "--engine-arg=--dtype=bfloat16)")
    p.add_argument("--threads", type=int, default=2,
                   help="OMP_NUM_THREADS of started services (default %(default)s)")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens (default %(default)s)")
    p.add_argument("--range-ratio", type=float, default=0.0,
                   help="prompt lengths uniform in input-len*(1 +- ratio) (default 0)")
    p.add_argument("--output-len", type=int, default=64,
                   help="generated tokens (default %(default)s)")
    p.add_argument("--prompt-file", type=Path, help="prompts, one per line (or a .json list)")
    p.add_argument("--num-prompts", type=int, default=64,
                   help="requests per run (default %(default)s)")
    p.add_argument("--concurrency", type=int, nargs="+", default=None,
                   help="requests in flight; several values run in turn (default 1)")
    p.add_argument("--request-rate", type=float, nargs="+",
                   help="Poisson arrivals per second (one run per value; the concurrency cap is "
                        "the first --concurrency value given explicitly, else none)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2, help="untimed requests first (default 2)")
    add_quiet_machine_args(p, "run")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--plot", type=Path, help="write a PNG of latency/throughput per run here")
    p.add_argument("--no-progress", action="store_true")
    return p


def load_specs(args: argparse.Namespace) -> list[LoadSpec]:
    """One spec per concurrency (or rate) and protocol, the protocols of a load side by side."""
    common = dict(output_len=args.output_len, temperature=args.temperature, seed=args.seed)
    if args.request_rate:
        cap = args.concurrency[0] if args.concurrency else None
        loads = [(cap, rate) for rate in args.request_rate]
    else:
        loads = [(c, math.inf) for c in args.concurrency or [1]]
    return [LoadSpec(cap, rate, protocol=protocol, **common)
            for cap, rate in loads for protocol in args.protocol]


def validate(args: argparse.Namespace) -> None:
    for name in ("input_len", "output_len", "num_prompts", "threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if any(c < 1 for c in args.concurrency or []):
        raise ValueError(f"--concurrency values must be >= 1, got {args.concurrency}")
    if args.request_rate and any(r <= 0 for r in args.request_rate):
        raise ValueError(f"--request-rate values must be > 0, got {args.request_rate}")
    if not 0.0 <= args.range_ratio < 1.0:
        raise ValueError(f"--range-ratio must be in [0, 1), got {args.range_ratio}")
    if args.start_services and not args.model:
        raise ValueError("--start-services needs --model DIR")


def measure_quietly(address: str, spec: LoadSpec, args: argparse.Namespace, seed: int) -> dict:
    """One run on fresh prompts; with --max-others, wait for an idle machine first and repeat (at
    most --retries times, new prompts each time: no prefix-cache hits) while other processes kept
    more than that many cores busy during it."""
    for attempt in range(args.retries + 1):
        prompts = (read_prompt_file(args.prompt_file, args.num_prompts) if args.prompt_file
                   else build_prompts(address, args.num_prompts, args.input_len,
                                      args.range_ratio, seed + attempt))
        if args.max_others is not None:
            wait_for_quiet(args.quiet_wait)
        with OtherLoad() as load:
            records, duration = asyncio.run(run_load(address, prompts, spec, not args.no_progress,
                                                     args.http_server))
        run = summarize_run(records, duration, spec.concurrency, spec.request_rate)
        run["protocol"] = spec.protocol
        run["others_cpu_cores"] = load.others_cores  # busy cores outside this process tree
        run["ours_cpu_cores"] = load.ours_cores
        if args.max_others is None or load.others_cores <= args.max_others:
            break
        print(f"other processes kept {load.others_cores:.2f} cores busy; "
              f"{'measuring again' if attempt < args.retries else 'keeping it'}", flush=True)
    return run


def benchmark(args: argparse.Namespace, address: str, specs: list[LoadSpec]) -> list[dict]:
    """Warm up, then one run per spec with fresh prompts (no prefix-cache hits across runs)."""
    spec_model = served_model(address)
    if args.warmup:
        warm = build_prompts(address, args.warmup, min(args.input_len, 16), 0.0, args.seed + 999)
        for protocol in args.protocol:
            asyncio.run(run_load(address, warm, LoadSpec(args.warmup, output_len=4,
                                                         protocol=protocol, model=spec_model),
                                 progress=False, http_url=args.http_server))
    runs = []
    for index, spec in enumerate(specs):
        spec.model = spec_model
        run = measure_quietly(address, spec, args, seed=args.seed + 1000 * index)
        print(f"protocol: {spec.protocol}")
        print_run(run)
        runs.append(run)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        validate(args)
    except ValueError as error:
        parser.error(str(error))
    threads = set_threads(args.threads, use_torch=False)
    specs = load_specs(args)
    info = machine_info()
    services = None
    if args.start_services:
        log_dir = Path(tempfile.mkdtemp(prefix="llmserve-bench-"))
        max_seqs = max([64, *(args.concurrency or [])])
        services = Services(args.model, ["--max-num-seqs", str(max_seqs), *args.engine_arg],
                            args.threads, log_dir)
    try:
        address = services.address if services else args.server
        if services:
            args.http_server = services.http_url
        runs = benchmark(args, address, specs)
    finally:
        if services:
            services.close()
    result = {"machine": info, "threads": threads, "server": address,
              "started_services": bool(services), "engine_args": args.engine_arg,
              "model": args.model, "input_len": args.input_len, "output_len": args.output_len,
              "range_ratio": args.range_ratio, "num_prompts": args.num_prompts,
              "temperature": args.temperature, "seed": args.seed, "protocols": args.protocol,
              "runs": runs}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        for protocol in args.protocol:  # one plot per protocol: <stem>_<protocol>.png for 2
            path = (args.plot if len(args.protocol) == 1
                    else args.plot.with_name(f"{args.plot.stem}_{protocol}{args.plot.suffix}"))
            plot_runs([r for r in runs if r["protocol"] == protocol], path,
                      title=f"{args.model or address} ({protocol}): in {args.input_len} / "
                            f"out {args.output_len} tokens")
            print(f"wrote {path}")
    return 0 if all(r["failed"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
