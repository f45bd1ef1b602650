"""Cold time to first token of one long prompt over gRPC vs one transformers forward over the
same ids (issue 17, "Must show" 1: cold TTFT of a ~2.7k-token prompt <= 0.7x the forward).

Prompts are windows of --target-tokens tokens of a long English text (every Debian machine has
/usr/share/common-licenses/GPL-3), each starting at another token, so no window is a prefix-cache
hit on another. The engine + tokenizer services start once per --chunk-sizes value (the engine's
--max-num-batched-tokens: a prompt longer than it is prefilled in chunks), all at once, and every
repeat takes, side by side, one new window through:
  cold        Generate of the window (max_new_tokens 1) on each engine: a cold prefix cache
  cached      the same window again at once: a prefix-cache hit (what is left is one token)
  hf_forward  transformers model(input_ids) over the ids the service tokenized the window to
              (logits at every position, as the issue measured it)
  hf_last     the same forward with logits_to_keep=1 (the last position's logits only, as the
              engine and transformers' generate compute them)
Medians per side, and cold / hf_forward both of the medians and per repeat (paired). The 1-minute
load average at start and end and the cores other processes kept busy are in the output: on a
shared machine compare ratios, not seconds, and note that transformers' OpenMP threads collapse
when a neighbour takes a core (--max-others waits for an idle machine; --threads 1 is immune).
The engines run a fixed OpenMP team (--no-adaptive-threads), as transformers does: with the
sides taking turns, the thread governor would count the others as busy neighbours and prefill on
one thread. The timed sides are in bench/cold_ttft_runners.py; --profile
(bench/cold_ttft_profile.py) says where the engine's prefill time goes instead.

    python bench/cold_ttft.py --json bench/results/cold_ttft_cpu.json
    python bench/cold_ttft.py --chunk-sizes 512 2048 4096 --repeats 3
    python bench/cold_ttft.py --env-variants LLMSERVE_CPU_PREFILL_BLOCKS=0   # kernel A/B
    python bench/cold_ttft.py --profile
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import add_quiet_machine_args, machine_info, set_threads  # noqa: E402

DEFAULT_MODEL = "models/smollm2-135m-instruct"
DEFAULT_TEXT = Path("/usr/share/common-licenses/GPL-3")
TARGET_RATIO = 0.7   # issue 17: cold TTFT <= 0.7x one transformers forward
SIDES = ("cold", "cached", "hf_forward", "hf_last")


# ---- prompts (pure) ------------------------------------------------------------------------------
def window_starts(total_tokens: int, target: int, count: int) -> list[int]:
    """`count` distinct first tokens of windows of `target` tokens, spread evenly over a text of
    `total_tokens` tokens (the first at 0)."""
    if target < 1 or count < 1:
        raise ValueError(f"target ({target}) and count ({count}) must be >= 1")
    room = total_tokens - target
    if room < count - 1:
        raise ValueError(f"a text of {total_tokens} tokens holds no {count} distinct windows of "
                         f"{target} tokens")
    step = room // (count - 1) if count > 1 else 0
    return [index * step for index in range(count)]


def window_text(text: str, offsets: Sequence[tuple[int, int]], start: int, target: int) -> str:
    """The text of tokens [start, start + target), given each token's (first, end) character."""
    if start < 0 or start + target > len(offsets):
        raise ValueError(f"tokens [{start}, {start + target}) lie outside {len(offsets)} tokens")
    return text[offsets[start][0]:offsets[start + target - 1][1]]


def build_windows(text: str, encode: Callable[[str], tuple[list[int], list[tuple[int, int]]]],
                  target: int, count: int) -> list[str]:
    """`count` prompts of about `target` tokens cut from `text` at token boundaries."""
    ids, offsets = encode(text)
    if len(ids) != len(offsets):
        raise ValueError("encode must give one (first, end) character pair per token")
    return [window_text(text, offsets, start, target)
            for start in window_starts(len(ids), target, count)]


# ---- summary (pure) ------------------------------------------------------------------------------
def summarize(seconds: dict[str, list[float]], baseline: str = "hf_forward",
              target_ratio: float = TARGET_RATIO) -> dict[str, object]:
    """Median ms per side; per side but the baseline: median / baseline median and the median of
    the per-repeat ratios (repeat i of each side ran side by side), and whether cold sides meet
    target_ratio."""
    base = seconds[baseline]
    medians = {side: statistics.median(values) * 1e3 for side, values in seconds.items()}
    ratios: dict[str, dict[str, float]] = {}
    for side, values in seconds.items():
        if side == baseline or len(values) != len(base):
            continue
        paired = [value / reference for value, reference in zip(values, base)]
        ratios[side] = {"of_medians": medians[side] / medians[baseline],
                        "paired_median": statistics.median(paired)}
    met = {side: ratio["of_medians"] <= target_ratio for side, ratio in ratios.items()
           if side.startswith("cold")}
    return {"median_ms": medians, "x_vs_" + baseline: ratios, "target_ratio": target_ratio,
            "target_met": met}


# ---- engines to start (pure) ------------------------------------------------------------------
def parse_env_variant(text: str) -> tuple[str, str]:
    """'NAME=VALUE' -> (NAME, VALUE), for --env-variants."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def engine_configs(chunk_sizes: Sequence[int], variants: Sequence[tuple[str, str]]
                   ) -> list[tuple[str, int, tuple[str, str] | None]]:
    """(label, chunk size, environment variable or None) of every engine to start: one per
    chunk size, and one more per chunk size and variant."""
    configs: list[tuple[str, int, tuple[str, str] | None]] = []
    for chunk in chunk_sizes:
        configs.append((f"_chunk{chunk}", chunk, None))
        configs.extend((f"_chunk{chunk}_{name}={value}", chunk, (name, value))
                       for name, value in variants)
    return configs



# ---- command line --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path(DEFAULT_MODEL))
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="long text to cut prompts from")
    p.add_argument("--target-tokens", type=int, default=2670, help="prompt length (tokens)")
    p.add_argument("--repeats", type=int, default=3, help="timed windows (one warm-up before)")
    p.add_argument("--chunk-sizes", type=int, nargs="+", default=[2048], metavar="N",
                   help="one engine per value of --max-num-batched-tokens (default 2048)")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads here and OMP_NUM_THREADS of the services")
    p.add_argument("--engine-args", type=shlex.split, default=[],
                   help="more engine_svc arguments as one string "
                        "(--engine-args='--adaptive-threads')")
    p.add_argument("--env-variants", type=parse_env_variant, nargs="+", default=[],
                   metavar="NAME=VALUE",
                   help="per chunk size, one more engine per variant with this environment "
                        "variable set, timed side by side (e.g. LLMSERVE_CPU_PREFILL_BLOCKS=0)")
    p.add_argument("--no-hf", action="store_true", help="services only")
    add_quiet_machine_args(p, "repeat")
    p.add_argument("--profile", action="store_true",
                   help="instead: where one cold prefill's time goes, in process "
                        "(bench/cold_ttft_profile.py)")
    p.add_argument("--json", type=Path, help="write the results here")
    return p


def print_summary(summary: dict, notes: list[str]) -> None:
    for side, ms in summary["median_ms"].items():
        ratio = summary["x_vs_hf_forward"].get(side)
        ratio_text = (f"  {ratio['of_medians']:.2f}x hf_forward (paired "
                      f"{ratio['paired_median']:.2f}x)") if ratio else ""
        print(f"{side:18} median {ms:8.1f} ms{ratio_text}")
    for side, met in summary["target_met"].items():
        print(f"{side}: {'meets' if met else 'misses'} the <= {TARGET_RATIO}x target")
    for note in sorted(set(notes)):
        print("note:", note)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM (timeout, kill) -> SystemExit, so the services are stopped on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    threads = set_threads(args.threads)
    if args.profile:
        from bench.cold_ttft_profile import profile_main

        return profile_main(args, threads)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(args.model / "tokenizer.json"))
    encode = lambda text: (lambda e: (e.ids, e.offsets))(tokenizer.encode(text))  # noqa: E731
    tries = args.repeats * ((args.retries + 1) if args.max_others is not None else 1)
    windows = build_windows(args.text.read_text(encoding="utf-8"), encode, args.target_tokens,
                            tries + 1)
    info = machine_info()
    print(f"{info['cpu']}, {args.threads} threads, load {info['load_average_1m_at_start']:.2f}; "
          f"prompts of ~{args.target_tokens} tokens from {args.text}; chunk sizes "
          f"{args.chunk_sizes}", flush=True)
    from bench.cold_ttft_runners import measure

    run = measure(args, windows)
    info["load_average_1m_at_end"] = os.getloadavg()[0]
    baseline = "hf_forward" if not args.no_hf else f"cold_chunk{args.chunk_sizes[0]}"
    summary = summarize(run.seconds, baseline)
    if args.no_hf:
        print({side: round(ms, 1) for side, ms in summary["median_ms"].items()})
    else:
        print_summary(summary, run.notes)
    print(f"load average {info['load_average_1m_at_start']:.2f} -> "
          f"{info['load_average_1m_at_end']:.2f}; others kept "
          f"{max(run.others_cores):.2f} cores busy at most")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "machine": info, "threads": threads, "model": str(args.model),
            "text": str(args.text), "target_tokens": args.target_tokens,
            "chunk_sizes": args.chunk_sizes, "engine_args": args.engine_args,
            "env_variants": [f"{name}={value}" for name, value in args.env_variants],
            "prompt_tokens": run.prompt_tokens, "seconds": run.seconds,
            "cached_prompt_tokens": run.cached_tokens, "others_cores": run.others_cores,
            "summary": summary, "notes": sorted(set(run.notes))}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
