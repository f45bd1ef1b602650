"""Summaries, console tables and the PNG plot of bench/serve.py runs."""
from __future__ import annotations

import math
from pathlib import Path

from bench.common import summarize_ms

LATENCIES = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")


def summarize_run(records: list, duration_s: float, concurrency: int | None,
                  request_rate: float) -> dict:
    """vllm-style summary of one run: throughput and latency statistics over completed requests."""
    done = [r for r in records if not r.error]
    output_tokens = sum(r.output_tokens for r in done)
    input_tokens = sum(r.prompt_tokens for r in done)
    tpots = [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    return {
        "concurrency": concurrency,
        "request_rate": None if math.isinf(request_rate) else request_rate,
        "num_requests": len(records),
        "completed": len(done),
        "failed": len(records) - len(done),
        "errors": sorted({r.error for r in records if r.error})[:5],
        "duration_s": duration_s,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "cached_prompt_tokens": sum(r.cached_prompt_tokens for r in done),
        "output_tokens_per_request": sorted({r.output_tokens for r in done}),
        "request_throughput": len(done) / duration_s,
        "output_throughput": output_tokens / duration_s,
        "total_token_throughput": (input_tokens + output_tokens) / duration_s,
        "ttft_ms": summarize_ms([r.ttft_s for r in done]),
        "tpot_ms": summarize_ms(tpots),
        "itl_ms": summarize_ms([gap for r in done for gap in r.itl_s]),
        "e2e_ms": summarize_ms([r.e2e_s for r in done]),
    }


def run_label(run: dict) -> str:
    rate = run["request_rate"]
    return (f"concurrency={run['concurrency']}" if rate is None
            else f"rate={rate}/s cap={run['concurrency']}")


def print_run(run: dict) -> None:
    """A `vllm bench serve`-like block for one run."""
    print(f"==== {run_label(run)} " + "=" * 40)
    print(f"  requests ok/failed        {run['completed']}/{run['failed']} "
          f"in {run['duration_s']:.2f} s")
    if "others_cpu_cores" in run:
        print(f"  CPU cores busy: ours {run['ours_cpu_cores']:.2f}, "
              f"other processes {run['others_cpu_cores']:.2f}")
    for error in run["errors"]:
        print(f"  error: {error}")
    print(f"  input / output tokens     {run['total_input_tokens']} / {run['total_output_tokens']}"
          f" (cached prompt tokens {run['cached_prompt_tokens']})")
    print(f"  request throughput        {run['request_throughput']:.2f} req/s")
    print(f"  output token throughput   {run['output_throughput']:.1f} tok/s")
    print(f"  total token throughput    {run['total_token_throughput']:.1f} tok/s")
    print(f"  {'latency (ms)':24}  {'mean':>9} {'p50':>9} {'p99':>9}")
    for key in LATENCIES:
        stats = run[key]
        print(f"  {key.removesuffix('_ms').upper():24}  {stats['mean']:9.2f} {stats['p50']:9.2f} "
              f"{stats['p99']:9.2f}")


def plot_runs(runs: list[dict], path: Path, title: str) -> None:
    """Throughput and latency (p50 solid, p99 dashed) against concurrency or request rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_rate = runs[0]["request_rate"] is not None
    xs = [r["request_rate"] if by_rate else r["concurrency"] for r in runs]
    fig, (ax_tput, ax_lat, ax_tpot) = plt.subplots(1, 3, figsize=(15, 4.5))
    ax_tput.plot(xs, [r["output_throughput"] for r in runs], "o-", label="output tok/s")
    ax_tput.set_ylabel("output tokens/s")
    ax_req = ax_tput.twinx()
    ax_req.plot(xs, [r["request_throughput"] for r in runs], "s--", color="tab:gray",
                label="req/s")
    ax_req.set_ylabel("requests/s")
    ax_tput.set_title("throughput")
    handles = ax_tput.get_legend_handles_labels()
    more = ax_req.get_legend_handles_labels()
    ax_req.legend(handles[0] + more[0], handles[1] + more[1], fontsize=8, loc="lower right")
    for key, color in (("ttft_ms", "tab:blue"), ("e2e_ms", "tab:red")):
        ax_lat.plot(xs, [r[key]["p50"] for r in runs], "o-", color=color, label=f"{key} p50")
        ax_lat.plot(xs, [r[key]["p99"] for r in runs], "o--", color=color, label=f"{key} p99")
    ax_lat.set_title("TTFT and end-to-end latency")
    ax_lat.set_ylabel("ms")
    for key, color in (("tpot_ms", "tab:green"), ("itl_ms", "tab:purple")):
        ax_tpot.plot(xs, [r[key]["p50"] for r in runs], "o-", color=color, label=f"{key} p50")
        ax_tpot.plot(xs, [r[key]["p99"] for r in runs], "o--", color=color, label=f"{key} p99")
    ax_tpot.set_title("time per output token / inter-token latency")
    ax_tpot.set_ylabel("ms")
    for ax in (ax_tput, ax_lat, ax_tpot):
        ax.set_xlabel("request rate (req/s)" if by_rate else "concurrency")
        if not by_rate and len(xs) > 1 and min(xs) > 0:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.grid(True, alpha=0.3)
        if ax is not ax_tput:
            ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
