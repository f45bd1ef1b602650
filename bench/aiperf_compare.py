"""Cross-check bench/serve.py --protocol http against aiperf, an OpenAI-API load generator nobody
here wrote, on the same running services and the same workload shape.

Both tools send streamed /v1/completions requests with `ignore_eos` (exactly --output-len tokens
each, counted from the server's usage field), --input-len prompt tokens, --num-prompts requests
at each --concurrency after --warmup untimed ones. The runs alternate (serve, aiperf, serve,
aiperf, ...; --rounds pairs) so that a change in the machine's load hits both tools alike. While
each tool runs, the CPU time of the engine, the tokenizer service, the tool's own process tree
and everything else on the machine is sampled from /proc, and reported (in cores) over the
tool's measurement window: on a small machine a load generator that needs a core of its own
slows the server it measures. Output tokens per engine CPU-second (throughput over the engine's
cores) stays comparable when another job takes a share of the machine.

aiperf's plain --concurrency mode keeps its slots full by polling for a free one without ever
sleeping (aiperf 0.13.0): its timing process keeps running for the whole run, taking whatever
share of a core the scheduler gives it (0.2-0.9 cores measured here), and on 2 cores that share
is taken from the engine. --aiperf-pacing poll (the default) adds a constant --request-rate
under the same concurrency cap, so that process sleeps between ticks (0.05 cores) and a freed
slot waits at most 1/--aiperf-poll-rate s; --aiperf-pacing burst runs the plain mode.

aiperf is not a requirement of this repository: install it into a separate virtual environment
and pass its executable with --aiperf, e.g.

    python -m venv /tmp/aiperf-venv && /tmp/aiperf-venv/bin/pip install aiperf==0.13.0
    python bench/aiperf_compare.py --aiperf /tmp/aiperf-venv/bin/aiperf \\
        --model models/smollm2-135m-instruct --concurrency 1 8 --rounds 2 \\
        --json bench/results/aiperf_vs_serve_http_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (REPO_ROOT, Services, machine_busy_s, machine_info,  # noqa: E402
                          proc_table, tree_cpu_s, wait_for_quiet)



def request_count(args: argparse.Namespace, concurrency: int) -> int:
    """Timed requests of one run: --num-prompts, at least twice the concurrency."""
    return max(args.num_prompts, 2 * concurrency)


# TTFT's mean besides its p50: with prompts prefilled --max-num-batched-tokens at a time, the TTFTs
# of a concurrency wave fall into steps, and a p50 on the edge of a step jumps between them
METRICS = ("output_tokens_per_s", "ttft_ms_mean", "ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50",
           "itl_ms_p50", "e2e_ms_p50")


# ---- CPU accounting ------------------------------------------------------------------------------
@dataclass(slots=True)
class CpuSample:
    """Cumulative CPU seconds at one wall-clock instant."""

    at: float
    machine: float
    engine: float
    tokenizer: float
    tool: float


@dataclass(slots=True)
class CpuSampler:
    """Background thread: CPU seconds of the engine, the tokenizer and the running tool's tree."""

    engine_pid: int
    tokenizer_pid: int
    interval_s: float = 0.5
    tool_pid: int = -1
    tool_seconds: float = 0.0     # the last tool tree reading (kept when its processes exit)
    samples: list[CpuSample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def sample(self) -> None:
        table = proc_table(include_reaped=True)
        if self.tool_pid > 0 and self.tool_pid in table:
            self.tool_seconds = tree_cpu_s(table, self.tool_pid)
        self.samples.append(CpuSample(time.time(), machine_busy_s(),
                                      tree_cpu_s(table, self.engine_pid),
                                      tree_cpu_s(table, self.tokenizer_pid), self.tool_seconds))

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.wait(self.interval_s):
                self.sample()
        threading.Thread(target=loop, daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def cores(self, start: float, end: float) -> dict[str, float]:
        """Mean cores busy per group between two wall-clock times (nearest samples inside)."""
        inside = [s for s in self.samples if start <= s.at <= end]
        if len(inside) < 2:
            return {}
        first, last = inside[0], inside[-1]
        span = last.at - first.at
        groups = {name: (getattr(last, name) - getattr(first, name)) / span
                  for name in ("engine", "tokenizer", "tool")}
        machine = (last.machine - first.machine) / span
        groups["others"] = max(0.0, machine - sum(groups.values()))
        groups["machine"] = machine
        return {name: round(value, 3) for name, value in groups.items()}


# ---- the two tools -------------------------------------------------------------------------------
def serve_command(args: argparse.Namespace, services: Services, concurrency: int, seed: int,
                  json_path: Path) -> list[str]:
    return [sys.executable, "bench/serve.py", "--server", services.address,
            "--http-server", services.http_url, "--protocol", "http",
            "--concurrency", str(concurrency),
            "--num-prompts", str(request_count(args, concurrency)),
            "--input-len", str(args.input_len), "--output-len", str(args.output_len),
            "--warmup", str(args.warmup), "--seed", str(seed), "--no-progress",
            "--json", str(json_path)]


def aiperf_command(args: argparse.Namespace, services: Services, model_name: str,
                   concurrency: int, seed: int, artifact_dir: Path, pacing: str) -> list[str]:
    """aiperf profile with the same workload; pacing "poll" adds a constant --request-rate of
    --aiperf-poll-rate under the --concurrency cap (see the module docstring)."""
    command = [args.aiperf, "profile", "--model", model_name, "--url", services.http_url,
               "--endpoint-type", "completions", "--streaming",
               "--tokenizer", str(Path(args.model).resolve()),
               "--concurrency", str(concurrency),
               "--request-count", str(request_count(args, concurrency)),
               "--prompt-input-tokens-mean", str(args.input_len),
               "--prompt-input-tokens-stddev", "0",
               "--prompt-output-tokens-mean", str(args.output_len),
               "--prompt-output-tokens-stddev", "0",
               "--extra-inputs", "ignore_eos:true", "--use-server-token-count",
               "--warmup-request-count", str(args.warmup), "--random-seed", str(seed),
               # one prompt per request, warm-up ones included: no prefix-cache hits
               "--num-dataset-entries", str(args.warmup + request_count(args, concurrency)),
               "--dataset-sampling-strategy", "sequential",
               "--ui-type", "none", "--no-server-metrics", "--no-gpu-telemetry",
               "--artifact-dir", str(artifact_dir)]
    if pacing == "poll":
        command += ["--request-rate", str(args.aiperf_poll_rate), "--arrival-pattern", "constant"]
    if args.aiperf_workers:
        command += ["--workers-max", str(args.aiperf_workers)]
    if args.aiperf_record_processors:
        command += ["--record-processors", str(args.aiperf_record_processors)]
    return command + args.aiperf_arg


def command_template(command: list[str]) -> list[str]:
    """An aiperf command with its per-run values as placeholders, for the result file."""
    placeholders = {"--url": "URL", "--concurrency": "C", "--request-count": "N",
                    "--random-seed": "SEED", "--num-dataset-entries": "WARMUP+N",
                    "--artifact-dir": "DIR"}
    return [placeholders.get(command[i - 1], word) if i else "aiperf"
            for i, word in enumerate(command)]


def read_serve(json_path: Path) -> dict:
    """The figures of one bench/serve.py run; its window is the duration_s before it wrote them."""
    run = json.loads(json_path.read_text())["runs"][0]
    ended_at = json_path.stat().st_mtime
    return {"output_tokens_per_s": run["output_throughput"],
            "ttft_ms_mean": run["ttft_ms"]["mean"], "ttft_ms_p50": run["ttft_ms"]["p50"],
            "ttft_ms_p99": run["ttft_ms"]["p99"],
            "tpot_ms_p50": run["tpot_ms"]["p50"], "itl_ms_p50": run["itl_ms"]["p50"],
            "e2e_ms_p50": run["e2e_ms"]["p50"], "completed": run["completed"],
            "output_tokens": run["total_output_tokens"],
            "output_tokens_per_request": run["output_tokens_per_request"],
            "duration_s": run["duration_s"],
            "cached_prompt_tokens": run["cached_prompt_tokens"],
            "tool_own_cores": run.get("ours_cpu_cores"),
            "window": (ended_at - run["duration_s"], ended_at)}


def read_aiperf(artifact_dir: Path) -> dict:
    """The figures of one aiperf run; its window spans the profiling requests' own timestamps."""
    summary = json.loads((artifact_dir / "profile_export_aiperf.json").read_text())
    starts, ends = [], []
    for line in (artifact_dir / "profile_export.jsonl").read_text().splitlines():
        meta = json.loads(line)["metadata"]
        if meta.get("benchmark_phase") == "profiling":
            starts.append(meta["request_start_ns"] / 1e9)
            ends.append(meta["request_end_ns"] / 1e9)
    return {"output_tokens_per_s": summary["output_token_throughput"]["avg"],
            "ttft_ms_mean": summary["time_to_first_token"]["avg"],
            "ttft_ms_p50": summary["time_to_first_token"]["p50"],
            "ttft_ms_p99": summary["time_to_first_token"]["p99"],
            "tpot_ms_p50": summary["inter_token_latency"]["p50"],   # (e2e - ttft) / (osl - 1)
            "itl_ms_p50": summary["inter_chunk_latency"]["p50"],    # gaps between SSE chunks
            "e2e_ms_p50": summary["request_latency"]["p50"],
            "completed": summary["completed_request_count"]["avg"],
            "output_tokens": summary["total_output_tokens"]["avg"],
            "output_tokens_per_request": sorted({summary["output_sequence_length"]["min"],
                                                 summary["output_sequence_length"]["max"]}),
            "duration_s": summary["benchmark_duration"]["avg"],
            "cached_prompt_tokens": summary.get("total_usage_prompt_cache_read_tokens",
                                                {}).get("avg", 0),
            "window": (min(starts), max(ends))}


def run_tool(command: list[str], sampler: CpuSampler, log_path: Path) -> None:
    """Run one tool to the end with its process tree sampled; raise if it fails."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
        sampler.tool_seconds, sampler.tool_pid = 0.0, process.pid
        code = process.wait()
        sampler.sample()
        sampler.tool_pid = -1
    if code != 0:
        raise RuntimeError(f"{command[0]} exited with {code}; log: {log_path}")


# ---- the comparison ------------------------------------------------------------------------------
def one_round(args: argparse.Namespace, services: Services, sampler: CpuSampler,
              model_name: str, concurrency: int, round_index: int,
              out_dir: Path) -> dict[str, dict]:
    """bench/serve.py, then aiperf once per --aiperf-pacing, at one concurrency; each run with
    its CPU breakdown over its measurement window and the 1-minute load average around it."""
    tag = f"c{concurrency}_r{round_index}"
    results = {}
    tools = ["serve", *(f"aiperf_{pacing}" for pacing in args.aiperf_pacing)]
    for tool_index, tool in enumerate(tools):
        # a seed per run: no run may reuse another's prompts (prefix-cache hits cut TTFT)
        seed = args.seed + 1000 * concurrency + 10 * round_index + tool_index
        if args.quiet_wait > 0:
            wait_for_quiet(args.quiet_wait)
        load_before = os.getloadavg()[0]
        if tool == "serve":
            json_path = out_dir / f"serve_{tag}.json"
            command = serve_command(args, services, concurrency, seed, json_path)
            run_tool(command, sampler, out_dir / f"serve_{tag}.log")
            result = read_serve(json_path)
        else:
            artifacts = out_dir / f"{tool}_{tag}"
            command = aiperf_command(args, services, model_name, concurrency, seed, artifacts,
                                     tool.removeprefix("aiperf_"))
            run_tool(command, sampler, out_dir / f"{tool}_{tag}.log")
            result = read_aiperf(artifacts)
        result["command"] = [Path(command[0]).name, *command[1:]]
        cores = result["cpu_cores_in_window"] = sampler.cores(*result.pop("window"))
        # what the engine made of the CPU it got: comparable under another job's load
        result["output_tokens_per_engine_cpu_s"] = (
            result["output_tokens_per_s"] / cores["engine"] if cores.get("engine") else 0.0)
        result["load_average_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        results[tool] = result
        print(f"c={concurrency} round {round_index} {tool:12s} " + " ".join(
            f"{key}={result[key]:.1f}" for key in METRICS) + " per_engine_cpu_s="
            f"{result['output_tokens_per_engine_cpu_s']:.0f} cpu={cores}"
            f" load={result['load_average_1m']}", flush=True)
    return results


def summarize(rounds: list[dict[str, dict]]) -> dict:
    """Medians over rounds per tool, and each aiperf run's median over bench/serve.py's."""
    keys = (*METRICS, "output_tokens_per_engine_cpu_s")
    medians = {tool: {key: statistics.median(r[tool][key] for r in rounds) for key in keys}
               for tool in rounds[0]}
    ratios = {tool: {key: round(medians[tool][key] / medians["serve"][key], 3) for key in keys}
              for tool in medians if tool != "serve"}
    return {"median": medians, "over_serve": ratios}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--aiperf", required=True, metavar="PATH",
                   help="the aiperf executable, from a virtual environment of its own")
    p.add_argument("--model", default="models/smollm2-135m-instruct",
                   help="model directory to serve; aiperf reads its tokenizer "
                        "(default %(default)s)")
    p.add_argument("--engine-arg", action="append", default=None, metavar="ARG",
                   help="engine_svc argument (repeatable; default --dtype bfloat16 "
                        "--max-model-len 1024 --max-num-seqs 64)")
    p.add_argument("--threads", type=int, default=2,
                   help="OMP_NUM_THREADS of the services (default %(default)s)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--rounds", type=int, default=2,
                   help="rounds per concurrency, each runs every tool once (default %(default)s)")
    p.add_argument("--num-prompts", type=int, default=16,
                   help="timed requests per run, at least 2 x concurrency (default %(default)s)")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--warmup", type=int, default=2, help="untimed requests per run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--aiperf-pacing", nargs="+", choices=("poll", "burst"), default=["poll"],
                   help="how aiperf keeps --concurrency requests in flight: burst = its plain "
                        "concurrency mode (its timing process polls for a free slot without "
                        "sleeping, a busy core); poll = a constant --request-rate of "
                        "--aiperf-poll-rate under the same cap. Several: each in turn "
                        "(default poll)")
    p.add_argument("--aiperf-poll-rate", type=float, default=100.0, metavar="PER_S",
                   help="request-rate ticks per second of --aiperf-pacing poll: a freed slot "
                        "waits at most 1/PER_S s for its next request (default %(default)s)")
    p.add_argument("--aiperf-workers", type=int, default=0,
                   help="aiperf --workers-max (default: aiperf's own choice)")
    p.add_argument("--aiperf-record-processors", type=int, default=0,
                   help="aiperf --record-processors (default: aiperf's own choice)")
    p.add_argument("--aiperf-arg", action="append", default=[], metavar="ARG",
                   help="extra aiperf profile argument (repeatable)")
    p.add_argument("--quiet-wait", type=float, default=0.0, metavar="S",
                   help="before each run, wait up to S seconds for an idle machine (default 0)")
    p.add_argument("--out-dir", type=Path, help="tool outputs and logs (default: a temp dir)")
    p.add_argument("--json", type=Path, help="write every run and the medians here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not Path(args.aiperf).is_file():
        raise SystemExit(f"--aiperf {args.aiperf}: no such file")
    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="aiperf-compare-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    engine_args = args.engine_arg or ["--dtype", "bfloat16", "--max-model-len", "1024",
                                      "--max-num-seqs", "64"]
    info = machine_info()
    rows = []
    with Services(args.model, [*engine_args, "--log-level", "WARNING"], args.threads,
                  out_dir / "logs") as services:
        sampler = CpuSampler(services.engine.process.pid, services.tokenizer.process.pid)
        sampler.start()
        model_name = Path(args.model).resolve().name
        commands = {f"aiperf_{pacing}": command_template(aiperf_command(
            args, services, model_name, 0, 0, Path("DIR"), pacing))
            for pacing in args.aiperf_pacing}
        try:
            for concurrency in args.concurrency:
                rounds = [one_round(args, services, sampler, model_name, concurrency, r, out_dir)
                          for r in range(args.rounds)]
                rows.append({"concurrency": concurrency, **summarize(rounds), "rounds": rounds})
                print(json.dumps({"concurrency": concurrency, **rows[-1]["over_serve"]}),
                      flush=True)
        finally:
            sampler.stop()
    result = {"machine": info, "engine_args": engine_args, "threads": args.threads,
              "workload": {"input_len": args.input_len, "output_len": args.output_len,
                           "num_prompts": args.num_prompts, "warmup": args.warmup,
                           "endpoint": "/v1/completions, stream, ignore_eos"},
              "aiperf_commands": commands, "rows": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
