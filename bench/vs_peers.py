"""llmserve vs llama.cpp's llama-server on the same prompts, token counts and threads.

The peer is built once from the llama-cpp-python sdist (bench/peers/build_llama_cpp.py, cached
under ~/.cache/llmserve/peers/) with BF16 and Q8_0 GGUFs requantized from the shipped Q4_1.
For each concurrency (one run each, fresh prompts per level, the same ones for every side):
  llmserve   engine_svc + tokenizer_svc, gRPC Generate (text prompts that tokenize to the ids),
             greedy, ignore_eos, max_new_tokens; one service per --variants entry: bf16, or
             --quantization int8 / int4 / gguf (the shipped GGUF's own Q4_1 and Q8_0 tensors)
  llama.cpp  llama-server -np <concurrency> -t <threads>, /completion with the token ids,
             temperature 0, ignore_eos, n_predict, cache_prompt off; one server per level
Prints output tok/s and TTFT p50 per side, each llmserve variant / each llama.cpp GGUF, / the
best llama.cpp GGUF at that concurrency, and / llmserve bf16; --json saves them with the
command, the CPU model and the versions.

    python bench/vs_peers.py --num-prompts 16 --output-len 64 --variants bf16 int4 \
        --json bench/results/vs_peers_cpu.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (OtherLoad, Services, machine_info, set_threads,  # noqa: E402
                          stable_prompt_ids)
from bench.peers import build_llama_cpp  # noqa: E402
from bench.peers.llama_server import (LlamaServer, LlamaServerConfig, run_completions,  # noqa: E402
                                      server_version)
from bench.serve import LoadSpec, Prompt, run_load  # noqa: E402
from bench.serve_report import summarize_run  # noqa: E402

DEFAULT_MODEL = "models/smollm2-135m-instruct"
LLMSERVE = "llmserve"
BASELINE = "bf16"
# llmserve variant -> its engine arguments (beside --engine-arg)
VARIANTS = {"bf16": ["--dtype=bfloat16"],
            "int8": ["--dtype=bfloat16", "--quantization=int8"],
            "int4": ["--dtype=bfloat16", "--quantization=int4"],
            "gguf": ["--dtype=bfloat16", "--quantization=gguf"]}


def side_name(variant: str) -> str:
    """The results key of one llmserve variant."""
    return f"{LLMSERVE} {variant}"


def make_levels(model_dir: Path, levels: list[int], count: int, input_len: int,
                seed: int) -> dict[int, list[tuple[str, list[int]]]]:
    """Per concurrency: max(count, concurrency) fresh prompts of input_len tokens, as (text,
    ids) with encode(text) == ids; one more level (key 0) of a single warm-up prompt."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    vocab = tokenizer.get_vocab_size()
    encode = lambda text: tokenizer.encode(text, add_special_tokens=True).ids  # noqa: E731
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    rng = np.random.default_rng(seed)
    out = {}
    for level in [0, *levels]:
        size = 1 if level == 0 else max(count, level)
        out[level] = [stable_prompt_ids(encode, decode, rng, input_len, min(1000, vocab // 4),
                                        vocab) for _ in range(size)]
    return out


def summarize(records, duration: float, level: int, load: OtherLoad) -> dict:
    summary = summarize_run(records, duration, level, float("inf"))
    summary["others_cores"] = load.others_cores
    return summary


def run_llmserve(args: argparse.Namespace, variant: str, prompts,
                 log_dir: Path) -> dict[int, dict]:
    """Every level through one llmserve (engine + tokenizer services), warm-up first."""
    results = {}
    engine_args = VARIANTS[variant] + args.engine_arg
    with Services(args.model, engine_args, args.threads, log_dir) as services:
        for level, pairs in prompts.items():
            batch = [Prompt(text, len(ids)) for text, ids in pairs]
            spec = LoadSpec(concurrency=max(level, 1), output_len=args.output_len)
            with OtherLoad() as load:
                records, duration = asyncio.run(run_load(services.address, batch, spec,
                                                         progress=False))
            if level:
                results[level] = summarize(records, duration, level, load)
                results[level]["engine_args"] = engine_args
                print_line(side_name(variant), results[level])
    return results


def run_llama(args: argparse.Namespace, build: build_llama_cpp.PeerBuild, quant: str, prompts,
              log_dir: Path) -> dict[int, dict]:
    """Every level through a llama-server with that many slots, warm-up first."""
    results = {}
    for level, pairs in prompts.items():
        if level == 0:
            continue
        config = LlamaServerConfig(Path(build.server), Path(build.ggufs[quant]), slots=level,
                                   ctx_per_slot=args.input_len + args.output_len + 64,
                                   threads=args.threads, log_dir=log_dir)
        with LlamaServer(config) as server:
            asyncio.run(run_completions(server.url, [prompts[0][0][1]], 1, args.output_len))
            with OtherLoad() as load:
                records, duration = asyncio.run(run_completions(
                    server.url, [ids for _, ids in pairs], level, args.output_len))
        results[level] = summarize(records, duration, level, load)
        results[level]["command"] = " ".join(server.command)
        print_line(f"llama.cpp {quant}", results[level])
    return results


def print_line(side: str, summary: dict) -> None:
    print(f"  {side:<16} concurrency {summary['concurrency']:>3}: "
          f"{summary['output_throughput']:8.1f} tok/s, TTFT p50 {summary['ttft_ms']['p50']:8.1f} ms"
          f", {summary['completed']}/{summary['num_requests']} done"
          f"{'' if not summary['failed'] else ' errors: ' + '; '.join(summary['errors'])}"
          f", others busy {summary['others_cores']:.2f} cores", flush=True)


def _ratio(ours: float, theirs: float) -> float | None:
    return ours / theirs if ours and theirs else None


def ratio_table(results: dict[str, dict[int, dict]], variants: list[str], quants: list[str],
                levels: list[int]) -> tuple[list[str], dict]:
    """Lines of the tok/s table and {level: {variant: {quant | "best" | "bf16": ratio}}}: each
    llmserve variant over each llama.cpp GGUF, over the best of them at that level and over
    llmserve bf16 (None where a side has no completed run at that level)."""
    peers = [q for q in quants if q in results]
    ours = [v for v in variants if side_name(v) in results]
    sides = [side_name(v) for v in ours] + peers
    head = f"{'concurrency':>11}" + "".join(f"{s + ' tok/s':>{max(16, len(s) + 7)}}"
                                            for s in sides)
    ratio_heads = [f"{v} x best" for v in ours if peers] + [
        f"{v} x bf16" for v in ours if v != BASELINE and BASELINE in ours]
    lines, ratios = [head + "".join(f"{h:>16}" for h in ratio_heads)], {}
    for level in levels:
        tok_s = {s: results[s].get(level, {}).get("output_throughput", 0.0) for s in sides}
        best = max((tok_s[q] for q in peers), default=0.0)
        baseline = tok_s.get(side_name(BASELINE), 0.0)
        ratios[level] = {}
        for variant in ours:
            mine = tok_s[side_name(variant)]
            entry = {q: _ratio(mine, tok_s[q]) for q in peers}
            if peers:
                entry["best"] = _ratio(mine, best)
            if variant != BASELINE and BASELINE in ours:
                entry[BASELINE] = _ratio(mine, baseline)
            ratios[level][variant] = entry
        cells = [ratios[level][v]["best"] for v in ours if peers] + [
            ratios[level][v][BASELINE] for v in ours if v != BASELINE and BASELINE in ours]
        lines.append(f"{level:>11}" + "".join(
            f"{tok_s[s]:>{max(16, len(s) + 7)}.1f}" for s in sides) + "".join(
            f"{r:>15.2f}x" if r is not None else f"{'-':>16}" for r in cells))
    return lines, ratios


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path(DEFAULT_MODEL),
                   help="llmserve's model directory (default %(default)s)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--num-prompts", type=int, default=16,
                   help="prompts per level, at least the concurrency (default 16)")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens (default 128)")
    p.add_argument("--output-len", type=int, default=64, help="new tokens each (default 64)")
    p.add_argument("--threads", type=int, default=2, help="threads of each side (default 2)")
    p.add_argument("--quants", nargs="+", default=["Q4_1", "Q8_0", "BF16"],
                   choices=["Q4_1", "Q8_0", "BF16"], help="llama.cpp GGUFs to run")
    p.add_argument("--engine-arg", action="append", default=[],
                   help="extra engine_svc argument (repeatable), e.g. "
                        "--engine-arg=--dtype=bfloat16")
    p.add_argument("--variants", nargs="+", default=[BASELINE], choices=list(VARIANTS),
                   help="llmserve weights to run, one service each (default bf16): bf16, "
                        "int8 / int4 (quantized at load), gguf (the GGUF's own tensors)")
    p.add_argument("--no-llmserve", action="store_true", help="run only the peer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the results here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if min(args.concurrency) < 1 or args.num_prompts < 1 or args.input_len < 1 \
            or args.output_len < 1:
        raise SystemExit("--concurrency, --num-prompts, --input-len, --output-len must be >= 1")
    threads = set_threads(args.threads, use_torch=False)
    build = build_llama_cpp.ensure_built()
    prompts = make_levels(args.model, args.concurrency, args.num_prompts, args.input_len,
                          args.seed)
    results: dict[str, dict[int, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="vs_peers-") as scratch:
        log_dir = Path(scratch)
        for variant in [] if args.no_llmserve else args.variants:
            results[side_name(variant)] = run_llmserve(args, variant, prompts, log_dir)
        for quant in args.quants:
            results[quant] = run_llama(args, build, quant, prompts, log_dir)
    lines, ratios = ratio_table(results, args.variants, args.quants, args.concurrency)
    print("\n".join(lines))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"machine": machine_info(), "threads": threads, "args": {
            k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "llama_cpp": {"llama_cpp_python_sdist": build.version,
                          "server_version": server_version(Path(build.server)),
                          "cmake_flags": build.cmake_flags},
            "results": results, "ratios_llmserve_over_llama_cpp_and_bf16": ratios, "table": lines}
        args.json.write_text(json.dumps(payload, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
