"""Prefix caching benchmark: a shared system prompt, cache on vs off, side by side in one run.

    .venv/bin/python bench/prefix_bench.py --model models/smollm2-135m-instruct

Closed loop, in-process engine: `--concurrency` requests stay in flight; every request is the
same system prompt plus its own user question. Prints TTFT (mean, p50, p99) and output
tokens/s for both runs and the on/off ratios; `--json` saves them.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine_svc.config import EngineConfig  # noqa: E402
from engine_svc.engine import LLMEngine  # noqa: E402
from engine_svc.params import SamplingParams, StoppingParams  # noqa: E402


def build_prompts(model: str, count: int, system_tokens: int, seed: int) -> list[list[int]]:
    from tokenizer_svc.schema import ChatTurn
    from tokenizer_svc.tokenizer import ModelTokenizer

    tokenizer = ModelTokenizer.from_pretrained(model)
    rng = np.random.default_rng(seed)
    words = ("policy answer customer order refund shipping account support product warranty "
             "invoice delivery return exchange manager polite concise helpful detail").split()
    system = "You are a support assistant. Rules: " + " ".join(rng.choice(words, system_tokens))
    prompts = []
    for i in range(count):
        question = f"Question {i}: " + " ".join(rng.choice(words, 12)) + "?"
        prompts.append(tokenizer.chat_ids([ChatTurn("system", system), ChatTurn("user", question)]))
    return prompts


def run(engine: LLMEngine, prompts: list[list[int]], new_tokens: int,
        concurrency: int) -> dict[str, float]:
    sampling = SamplingParams(temperature=0.0)
    stopping = StoppingParams(max_new_tokens=new_tokens, ignore_eos=True)
    pending = list(enumerate(prompts))
    added: dict[str, float] = {}
    ttft: list[float] = []
    in_flight, produced = 0, 0
    started = time.perf_counter()
    while pending or in_flight:
        while pending and in_flight < concurrency:
            index, prompt = pending.pop(0)
            engine.add_request(f"r{index}", prompt, sampling, stopping)
            added[f"r{index}"] = time.perf_counter()
            in_flight += 1
        for out in engine.step():
            now = time.perf_counter()
            if out.token_ids and out.request_id in added:
                ttft.append(now - added.pop(out.request_id))
            produced += len(out.token_ids)
            in_flight -= out.finished
    elapsed = time.perf_counter() - started
    return {"ttft_mean_s": statistics.mean(ttft), "ttft_p50_s": float(np.percentile(ttft, 50)),
            "ttft_p99_s": float(np.percentile(ttft, 99)), "output_tokens_per_s": produced / elapsed,
            "elapsed_s": elapsed, "prefix_hit_tokens": engine.scheduler.prefix_hit_tokens,
            "prefix_queried_tokens": engine.scheduler.prefix_queried_tokens}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="models/smollm2-135m-instruct")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--system-tokens", type=int, default=300, help="words in the shared system prompt")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    prompts = build_prompts(args.model, args.num_prompts, args.system_tokens, args.seed)
    results = {}
    for label, caching in (("cache_off", False), ("cache_on", True)):
        engine = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, device="cpu",
                                        enable_prefix_caching=caching, max_model_len=2048,
                                        kv_capacity_tokens=16384))
        run(engine, prompts[:2], 2, 1)   # warm-up (then forget what it cached)
        if engine.prefix_cache is not None:
            engine.prefix_cache.clear()
        engine.scheduler.prefix_hit_tokens = engine.scheduler.prefix_queried_tokens = 0
        results[label] = run(engine, prompts, args.new_tokens, args.concurrency)
        print(f"{label:9s}  TTFT mean {results[label]['ttft_mean_s'] * 1e3:8.1f} ms  "
              f"p50 {results[label]['ttft_p50_s'] * 1e3:8.1f} ms  "
              f"p99 {results[label]['ttft_p99_s'] * 1e3:8.1f} ms  "
              f"{results[label]['output_tokens_per_s']:7.1f} tok/s  "
              f"hit {results[label]['prefix_hit_tokens']}/{results[label]['prefix_queried_tokens']}")
    on, off = results["cache_on"], results["cache_off"]
    ratios = {"ttft_mean_speedup": off["ttft_mean_s"] / on["ttft_mean_s"],
              "ttft_p50_speedup": off["ttft_p50_s"] / on["ttft_p50_s"],
              "throughput_ratio": on["output_tokens_per_s"] / off["output_tokens_per_s"]}
    print(f"cache on vs off: TTFT {ratios['ttft_mean_speedup']:.2f}x faster (mean), "
          f"{ratios['ttft_p50_speedup']:.2f}x (p50); throughput {ratios['throughput_ratio']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "benchmark": "prefix_bench", "command": " ".join(sys.argv), "machine": platform.node(),
            "cpu_count": torch.get_num_threads(), "torch": torch.__version__, "args": vars(args),
            "prompt_tokens": [len(p) for p in prompts], "results": results, "ratios": ratios},
            indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
