"""Chunked prefill benchmark: does one long prompt stall the streams already decoding?

    .venv/bin/python bench/chunked_prefill_bench.py --model models/smollm2-135m-instruct

Eight streams decode; in the second run a prompt several times the per-step token budget
arrives mid-way and is prefilled in chunks alongside them. Prints the streams' inter-token
latency (p50, p99) without and with the long prompt, side by side, and the p99 ratio.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine_svc.config import EngineConfig  # noqa: E402
from engine_svc.engine import LLMEngine  # noqa: E402
from engine_svc.params import SamplingParams, StoppingParams  # noqa: E402


def run(engine: LLMEngine, streams: list[list[int]], long_prompt: list[int] | None,
        new_tokens: int) -> dict[str, float]:
    greedy = SamplingParams(temperature=0.0)
    for i, prompt in enumerate(streams):
        engine.add_request(f"s{i}", prompt, greedy,
                           StoppingParams(max_new_tokens=new_tokens, ignore_eos=True))
    last: dict[str, float] = {}
    gaps: list[float] = []
    step = 0
    long_done_at = None
    while engine.has_work():
        if step == 5 and long_prompt is not None:
            engine.add_request("long", long_prompt, greedy,
                               StoppingParams(max_new_tokens=1, ignore_eos=True))
        for out in engine.step():
            now = time.perf_counter()
            if out.request_id == "long":
                long_done_at = step
                continue
            if out.request_id in last:
                gaps.append(now - last[out.request_id])
            last[out.request_id] = now
        step += 1
    return {"itl_p50_ms": float(np.percentile(gaps, 50)) * 1e3,
            "itl_p99_ms": float(np.percentile(gaps, 99)) * 1e3,
            "itl_max_ms": float(np.max(gaps)) * 1e3, "steps": step,
            "long_prompt_finished_at_step": long_done_at}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="models/smollm2-135m-instruct")
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--long-prompt-tokens", type=int, default=1024)
    p.add_argument("--budget", type=int, default=48, help="max_num_batched_tokens per step")
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    streams = [rng.integers(3, 40000, 16).tolist() for _ in range(args.streams)]
    long_prompt = rng.integers(3, 40000, args.long_prompt_tokens).tolist()
    engine = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, device="cpu",
                                    max_num_batched_tokens=args.budget,
                                    max_num_seqs=max(16, args.streams + 1),
                                    max_model_len=args.long_prompt_tokens + 64,
                                    enable_prefix_caching=False, kv_capacity_tokens=16384))
    run(engine, streams[:2], None, 4)  # warm-up
    alone = run(engine, streams, None, args.new_tokens)
    mixed = run(engine, streams, long_prompt, args.new_tokens)
    ratio = mixed["itl_p99_ms"] / alone["itl_p99_ms"]
    print(f"budget {args.budget} tokens/step, {args.streams} streams, long prompt "
          f"{args.long_prompt_tokens} tokens, {args.dtype}, {args.threads} threads")
    print(f"without long prompt: ITL p50 {alone['itl_p50_ms']:.1f} ms  p99 {alone['itl_p99_ms']:.1f} ms")
    print(f"with long prompt:    ITL p50 {mixed['itl_p50_ms']:.1f} ms  p99 {mixed['itl_p99_ms']:.1f} ms"
          f"  (prefilled over steps 5..{mixed['long_prompt_finished_at_step']})")
    print(f"p99 ratio: {ratio:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"benchmark": "chunked_prefill",
                                               "command": " ".join(sys.argv), "args": vars(args),
                                               "without": alone, "with": mixed,
                                               "p99_ratio": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
