"""This engine vs Hugging Face transformers on the same weights, prompts and token counts.

Per dtype (fp32 and bf16 by default) and scenario (single stream: one request at a time;
concurrent: all requests at once), in one process, one after another:
  (a) hf_sequential  transformers generate, one request at a time
  (b) hf_batched     transformers generate on one left-padded batch (concurrent scenario)
  (c) engine         LLMEngine in-process (greedy, ignore_eos)
  (d) service        engine_svc + tokenizer_svc over gRPC, requests sent like the scenario
Every side generates exactly --new-tokens per request, going on through EOS (the engine with
ignore_eos; transformers with an EOS id no row can produce, so EOS is an ordinary token).
Ratios are against the faster dtype of (a) and of (b).
A third scenario, ttft_probe, sends one prompt --ttft-repeats times, one after another, for
PROBE_TOKENS tokens each through (c) and (d) only: the p50 difference of their first-token
latencies is what the services add (tokenizing, two gRPC hops, detokenizing) with nothing else
varying (after the first request the prompt is a prefix-cache hit on both sides).

    python bench/vs_hf.py --json bench/results/vs_hf_cpu.json
    python bench/vs_hf.py --quick --model DIR --no-service
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (add_quiet_machine_args, machine_info, set_threads,  # noqa: E402
                          stable_prompt_ids, wait_for_quiet)
from bench.vs_hf_runners import (Measurement, run_engine, run_hf_batched,  # noqa: E402
                                 run_hf_sequential, run_service)

DEFAULT_MODEL = "models/smollm2-135m-instruct"
PROBE_TOKENS = 4   # tokens per ttft_probe request: enough for a first token and a few more


@dataclass(slots=True)
class Scenario:
    """A set of prompts, how many tokens each gets, and whether they run together."""

    name: str
    prompt_ids: list[list[int]]
    prompt_texts: list[str] | None   # None when the model has no tokenizer (no service run)
    new_tokens: int
    concurrent: bool
    probe: bool = False   # timing only: not run through transformers, no ratios



def make_prompts(model_dir: Path, count: int, min_len: int, max_len: int, vocab: int,
                 rng: np.random.Generator) -> tuple[list[list[int]], list[str] | None]:
    """Random prompts; with a tokenizer, texts whose encoding is exactly the ids."""
    lengths = rng.integers(min_len, max_len + 1, size=count)
    tokenizer_file = model_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        return [[int(t) for t in rng.integers(3, vocab, size=int(n))] for n in lengths], None
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    encode = lambda text: tokenizer.encode(text, add_special_tokens=True).ids  # noqa: E731
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    pairs = [stable_prompt_ids(encode, decode, rng, int(n), min(1000, vocab // 4), vocab)
             for n in lengths]
    return [ids for _, ids in pairs], [text for text, _ in pairs]


def build_scenarios(args: argparse.Namespace, vocab: int) -> list[Scenario]:
    rng = np.random.default_rng(args.seed)
    scenarios = []
    for name, count, concurrent in (("single_stream", args.single_prompts, False),
                                    (f"concurrent_{args.batch}", args.batch, True)):
        ids, texts = make_prompts(args.model, count, args.min_prompt_len, args.max_prompt_len,
                                  vocab, rng)
        scenarios.append(Scenario(name, ids, texts, args.new_tokens, concurrent))
    if args.ttft_repeats:
        ids, texts = make_prompts(args.model, 1, args.min_prompt_len, args.max_prompt_len, vocab,
                                  rng)
        scenarios.append(Scenario("ttft_probe", ids * args.ttft_repeats,
                                  texts * args.ttft_repeats if texts else None,
                                  min(PROBE_TOKENS, args.new_tokens),
                                  concurrent=False, probe=True))
    return scenarios


def run_all(args: argparse.Namespace, scenarios: list[Scenario]) -> list[Measurement]:
    """Every method x dtype x scenario, one at a time (nothing else runs meanwhile)."""
    results: list[Measurement] = []
    reference: dict[tuple[str, str], list[list[int]]] = {}   # (scenario, dtype) -> hf_sequential
    for dtype in args.dtypes:
        for method in args.methods:
            if method == "service" and (args.no_service or scenarios[0].prompt_texts is None):
                continue
            for measurement in measure_quietly(method, dtype, scenarios, args):
                key = (measurement.scenario, dtype)
                if method == "hf_sequential":
                    reference[key] = measurement.outputs
                measurement.score_against(reference.get(key))
                print(measurement.line(), flush=True)
                results.append(measurement)
            gc.collect()
    return results


def measure_quietly(method: str, dtype: str, scenarios: list[Scenario],
                    args: argparse.Namespace) -> list[Measurement]:
    """run_method, repeated (after waiting for an idle machine) while other processes were
    busy during it, at most --retries times; the last attempt is kept either way."""
    for attempt in range(args.retries + 1):
        if args.max_others is not None:
            wait_for_quiet(args.quiet_wait)
        measurements = best_of_runs(method, dtype, scenarios, args)
        busy = max(m.others_cores for m in measurements) if measurements else 0.0
        if args.max_others is None or busy <= args.max_others:
            break
        print(f"  {method} {dtype}: other processes kept {busy:.2f} cores busy; "
              f"{'measuring again' if attempt < args.retries else 'keeping it'}", flush=True)
    return measurements


def best_of_runs(method: str, dtype: str, scenarios: list[Scenario],
                 args: argparse.Namespace) -> list[Measurement]:
    """run_method --repeats times (hf_sequential once: it takes minutes and is the token
    reference); per scenario the fastest run is kept, every run's seconds go in extra."""
    runs = 1 if method == "hf_sequential" else args.repeats
    best: list[Measurement] = []
    seconds: list[list[float]] = []
    for _ in range(runs):
        measurements = run_method(method, dtype, scenarios, args)
        seconds = seconds or [[] for _ in measurements]
        for index, measurement in enumerate(measurements):
            seconds[index].append(round(measurement.seconds, 3))
            if index == len(best):
                best.append(measurement)
            elif measurement.seconds < best[index].seconds:
                best[index] = measurement
        gc.collect()
    for measurement, all_seconds in zip(best, seconds):
        measurement.extra["runs_seconds"] = all_seconds
    return best


def run_method(method: str, dtype: str, scenarios: list[Scenario],
               args: argparse.Namespace) -> list[Measurement]:
    if method == "hf_sequential":
        return run_hf_sequential(args.model, dtype, [s for s in scenarios if not s.probe],
                                 args.device)
    if method == "hf_batched":
        return run_hf_batched(args.model, dtype, [s for s in scenarios if s.concurrent],
                              args.device)
    if method == "engine":
        return run_engine(args.model, dtype, scenarios, args.max_model_len, args.device)
    log_dir = Path(tempfile.mkdtemp(prefix="llmserve-vs-hf-"))
    return [m for interval in args.stream_intervals
            for m in run_service(args.model, dtype, scenarios, args.max_model_len, args.threads,
                                 log_dir, args.device, stream_interval=interval)]


def ratio_table(results: list[Measurement]) -> list[dict]:
    """Rows with tokens/s and ratios to the best-dtype hf_sequential and hf_batched per scenario."""
    best: dict[tuple[str, str], float] = {}
    for m in results:
        if m.method in ("hf_sequential", "hf_batched"):
            key = (m.scenario, m.method)
            best[key] = max(best.get(key, 0.0), m.tokens_per_s)
    engine = {(m.scenario, m.dtype): m.tokens_per_s for m in results if m.method == "engine"}
    rows = []
    for m in results:
        row = {k: v for k, v in asdict(m).items() if k != "outputs"}
        for base in ("hf_sequential", "hf_batched"):
            ref = best.get((m.scenario, base))
            row[f"x_vs_{base}"] = m.tokens_per_s / ref if ref else None
        in_process = engine.get((m.scenario, m.dtype))
        row["x_vs_engine"] = (m.tokens_per_s / in_process
                              if in_process and m.method.startswith("service") else None)
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    head = (f"{'scenario':16} {'method':14} {'dtype':9} {'tok/s':>9} {'TTFT p50':>9} "
            f"{'x HF seq':>9} {'x HF batch':>10} {'x engine':>9} {'exact':>6} {'agree':>6} "
            f"{'others':>6}  note")
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        ratios = [f"{r[k]:.2f}" if r[k] is not None else "-"
                  for k in ("x_vs_hf_sequential", "x_vs_hf_batched", "x_vs_engine")]
        agree = f"{r['agree_with_hf']:.2f}" if r["agree_with_hf"] is not None else "-"
        ttft = r["extra"].get("ttft_ms", {}).get("p50")   # engine and service rows only
        ttft_text = f"{ttft:.0f} ms" if ttft is not None else "-"
        print(f"{r['scenario']:16} {r['method']:14} {r['dtype']:9} {r['tokens_per_s']:9.1f} "
              f"{ttft_text:>9} {ratios[0]:>9} {ratios[1]:>10} {ratios[2]:>9} "
              f"{str(r['exact_counts']):>6} {agree:>6} {r['others_cores']:6.2f}  {r['note']}")


def ttft_overheads(rows: list[dict]) -> list[dict]:
    """Per scenario and dtype: the service's TTFT p50 minus the in-process engine's (what
    tokenizing, two gRPC hops and detokenizing add to a request's first token)."""
    by_key = {(r["scenario"], r["dtype"], r["method"]): r for r in rows}
    out = []
    for (scenario, dtype, method), row in by_key.items():
        engine = by_key.get((scenario, dtype, "engine"))
        if not method.startswith("service") or engine is None:
            continue
        service_p50 = row["extra"].get("ttft_ms", {}).get("p50")
        engine_p50 = engine["extra"].get("ttft_ms", {}).get("p50")
        if service_p50 is None or engine_p50 is None:
            continue
        out.append({"scenario": scenario, "dtype": dtype, "method": method,
                    "engine_ttft_p50_ms": engine_p50,
                    "service_ttft_p50_ms": service_p50,
                    "overhead_p50_ms": service_p50 - engine_p50})
    for o in out:
        print(f"TTFT p50 {o['scenario']:16} {o['dtype']:9} {o['method']:12} "
              f"engine {o['engine_ttft_p50_ms']:8.1f} ms"
              f"  service {o['service_ttft_p50_ms']:8.1f} ms  overhead "
              f"{o['overhead_p50_ms']:+.1f} ms")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path(DEFAULT_MODEL))
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                   choices=["float32", "bfloat16"])
    p.add_argument("--methods", nargs="+", default=["hf_sequential", "hf_batched", "engine",
                                                    "service"],
                   choices=["hf_sequential", "hf_batched", "engine", "service"])
    p.add_argument("--device", default="cpu", help="cpu or cuda (every side runs there)")
    p.add_argument("--threads", type=int, default=2,
                   help="torch intra-op threads here and OMP_NUM_THREADS of the engine service")
    p.add_argument("--single-prompts", type=int, default=5)
    p.add_argument("--batch", type=int, default=32, help="requests of the concurrent scenario")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--min-prompt-len", type=int, default=64)
    p.add_argument("--max-prompt-len", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1,
                   help="runs of each method but hf_sequential; the fastest per scenario is kept "
                        "and every run's seconds are saved (default 1)")
    p.add_argument("--ttft-repeats", type=int, default=20,
                   help="requests of the ttft_probe scenario (one prompt repeated; 0: none)")
    p.add_argument("--no-service", action="store_true", help="skip (d), the gRPC services")
    p.add_argument("--stream-intervals", type=int, nargs="+", default=[1], metavar="N",
                   help="run the services once per value of the engine's --stream-interval "
                        "(method service, or service_siN for N > 1; default 1)")
    add_quiet_machine_args(p, "method")
    p.add_argument("--quick", action="store_true",
                   help="2 single prompts, batch 8, 16 new tokens, prompts of 16-32 tokens")
    p.add_argument("--json", type=Path, help="write the results here")
    return p


def validate(args: argparse.Namespace) -> None:
    for name in ("threads", "single_prompts", "batch", "new_tokens", "min_prompt_len", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if any(n < 1 for n in args.stream_intervals):
        raise ValueError(f"--stream-intervals values must be >= 1, got {args.stream_intervals}")
    if args.ttft_repeats < 0:
        raise ValueError(f"--ttft-repeats must be >= 0, got {args.ttft_repeats}")
    if args.max_prompt_len < args.min_prompt_len:
        raise ValueError(f"--max-prompt-len must be >= --min-prompt-len ({args.min_prompt_len}), "
                         f"got {args.max_prompt_len}")
    if args.max_prompt_len + args.new_tokens > args.max_model_len:
        raise ValueError(f"--max-prompt-len + --new-tokens must be <= --max-model-len "
                         f"({args.max_model_len})")
    if not (args.model / "config.json").is_file():
        raise ValueError(f"--model {args.model}: no config.json there")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        args.single_prompts, args.batch, args.new_tokens = 2, 8, 16
        args.min_prompt_len, args.max_prompt_len = 16, 32
        args.ttft_repeats = min(args.ttft_repeats, 3)
    try:
        validate(args)
    except ValueError as error:
        parser.error(str(error))
    threads = set_threads(args.threads)
    import torch
    import transformers

    vocab = json.loads((args.model / "config.json").read_text())["vocab_size"]
    scenarios = build_scenarios(args, vocab)
    info = machine_info()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {threads}, "
          f"dtypes {args.dtypes}, device {args.device}, model {args.model}", flush=True)
    rows = ratio_table(run_all(args, scenarios))
    print_table(rows)
    result = {"machine": info, "threads": threads, "model": str(args.model), "device": args.device,
              "new_tokens": args.new_tokens, "prompt_len_range": [args.min_prompt_len,
                                                                  args.max_prompt_len],
              "scenarios": {s.name: {"requests": len(s.prompt_ids), "concurrent": s.concurrent,
                                     "prompt_tokens": [len(p) for p in s.prompt_ids]}
                            for s in scenarios},
              "rows": rows, "ttft_overhead": ttft_overheads(rows)}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if all(r["exact_counts"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
