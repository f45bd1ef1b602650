"""Where one cold prefill of a long prompt spends its time: `bench/cold_ttft.py --profile`.

In process, bf16, one engine per --chunk-sizes value: the prompt (a window of --target-tokens
tokens of --text) is prefilled untimed-per-part through the C layer loop (the default path),
then another window through the Python layer loop with bench/profile_decode.py's timers on every
projection and kernel op (the same kernels, one call at a time). Then the projections' GEMM
choice at each chunk's row count, and the C pool attention against torch's
scaled_dot_product_attention on the same q/k/v for each chunk of the prompt.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import OtherLoad, machine_info
from bench.profile_decode import Timers, instrument


def chunks_of(tokens: int, chunk: int) -> list[tuple[int, int]]:
    """(prefix, new tokens) of each prefill step of a prompt of `tokens` at `chunk` per step."""
    return [(start, min(chunk, tokens - start)) for start in range(0, tokens, chunk)]


def _first_token_s(engine, ids: list[int], request_id: str) -> float:
    from engine_svc.params import SamplingParams, StoppingParams

    engine.add_request(request_id, ids, SamplingParams(temperature=0.0),
                       StoppingParams(max_new_tokens=1, ignore_eos=True))
    start = time.perf_counter()
    while engine.has_work():
        engine.step()
    return time.perf_counter() - start


def gemm_picks(model, rows: int) -> dict[str, str]:
    """Which product each projection of layer 0 runs at `rows` rows."""
    from kernels.cpu import linear

    layer = model.weights.layers[0]
    picks = {}
    for name in linear.PROJECTIONS:
        weight = getattr(layer, name)
        plan = linear.plan_of(weight) if weight.dim() == 3 else None
        kind = "C" if weight.dim() == 3 else ("oneDNN" if weight.is_mkldnn else "torch")
        picks[name] = "oneDNN" if plan is not None and plan.picks_onednn(rows) else kind
    return picks


def _best_ms(fn, repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def attention_vs_sdpa(prefix: int, new: int, q_heads: int, kv_heads: int, head_dim: int,
                      seed: int = 0) -> dict[str, float]:
    """ms of the engine's prefill attention (C pool kernel where built) and of torch SDPA
    (contiguous [1, heads, tokens, d], GQA) for one chunk of `new` tokens after `prefix`."""
    from kernels.cpu import ops

    generator = torch.Generator().manual_seed(seed)
    ctx = prefix + new
    k = torch.randn(ctx, kv_heads, head_dim, generator=generator).bfloat16()  # [ctx, kv, d]
    v = torch.randn(ctx, kv_heads, head_dim, generator=generator).bfloat16()
    q = torch.randn(new, q_heads, head_dim, generator=generator).bfloat16()  # [new, heads, d]
    table = torch.arange(ctx, dtype=torch.int32)[None]  # [1, ctx]
    slots = torch.tensor([0], dtype=torch.int32)
    prefixes = torch.tensor([prefix], dtype=torch.int32)
    cu_new = torch.tensor([0, new], dtype=torch.int32)
    scale = head_dim ** -0.5
    q4, k4, v4 = (x.transpose(0, 1).contiguous()[None] for x in (q, k, v))  # [1, heads, n, d]
    mask = None
    if prefix:   # new token i sits at prefix + i
        mask = torch.arange(ctx)[None, :] <= torch.arange(new)[:, None] + prefix
    engine_ms = _best_ms(lambda: ops.prefill_attention(q, k, v, table, slots, prefixes, cu_new,
                                                       new, scale))
    sdpa_ms = _best_ms(lambda: F.scaled_dot_product_attention(
        q4, k4, v4, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True))
    return {"prefix": prefix, "new": new, "engine_ms": engine_ms, "sdpa_ms": sdpa_ms}


def profile_chunk_size(args: argparse.Namespace, windows: list[list[int]], chunk: int) -> dict:
    """One engine at this chunk size: the C loop's cold first token, then the parts."""
    from engine_svc.config import EngineConfig
    from engine_svc.engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=str(args.model), dtype="bfloat16", device="cpu",
                                    max_model_len=args.max_model_len,
                                    max_num_batched_tokens=chunk, adaptive_threads=False))
    _first_token_s(engine, windows[0][:64], "warm")
    timers = Timers()
    instrument(engine, timers)
    with OtherLoad() as load:
        native_s = _first_token_s(engine, windows[1], "native")
        model = engine.runner.model
        native, model.native = model.native, None
        timers.enabled = True
        try:
            python_s = _first_token_s(engine, windows[2], "python")
        finally:
            model.native, timers.enabled = native, False
    parts = {label: 1e3 * s for label, s in sorted(timers.seconds.items(), key=lambda kv: -kv[1])
             if label.startswith(("matmul", "op ", "embedding"))}
    parts["rest of the step"] = 1e3 * python_s - sum(parts.values())
    steps = chunks_of(len(windows[1]), chunk)
    return {"chunk": chunk, "prompt_tokens": len(windows[1]), "c_loop_ms": 1e3 * native_s,
            "python_loop_ms": 1e3 * python_s, "parts_ms": parts,
            "gemm_picks": {rows: gemm_picks(model, rows) for rows in sorted({n for _, n in steps})},
            "others_cores": load.others_cores, "steps": steps}


def print_profile(result: dict) -> None:
    print(f"\nchunk {result['chunk']}: {result['prompt_tokens']} tokens in steps "
          f"{result['steps']}; first token {result['c_loop_ms']:.0f} ms (C layer loop), "
          f"{result['python_loop_ms']:.0f} ms (Python loop, timed); others "
          f"{result['others_cores']:.2f} cores")
    for label, ms in result["parts_ms"].items():
        print(f"  {label:32} {ms:8.1f} ms {100 * ms / result['python_loop_ms']:5.1f}%")
    for rows, picks in result["gemm_picks"].items():
        print(f"  GEMM at {rows} rows: " + ", ".join(f"{k} {v}" for k, v in picks.items()))
    for row in result["attention"]:
        print(f"  attention, {row['new']} new after {row['prefix']}: engine "
              f"{row['engine_ms']:.1f} ms, torch SDPA {row['sdpa_ms']:.1f} ms per layer")


def profile_main(args: argparse.Namespace, threads: dict) -> int:
    """--profile: per chunk size, the breakdown; prints it and writes --json."""
    import json

    from tokenizers import Tokenizer

    from bench.cold_ttft import window_starts
    from engine_svc.model_config import ModelConfig

    tokenizer = Tokenizer.from_file(str(args.model / "tokenizer.json"))
    ids = tokenizer.encode(Path(args.text).read_text(encoding="utf-8")).ids
    windows = [ids[start:start + args.target_tokens]
               for start in window_starts(len(ids), args.target_tokens, 3)]
    config = ModelConfig.from_dir(args.model)
    info = machine_info()
    print(f"{info['cpu']}, {args.threads} threads, load {info['load_average_1m_at_start']:.2f}")
    results = []
    for chunk in args.chunk_sizes:
        result = profile_chunk_size(args, windows, chunk)
        result["attention"] = [attention_vs_sdpa(prefix, new, config.num_heads,
                                                 config.num_kv_heads, config.head_dim)
                               for prefix, new in result["steps"]]
        print_profile(result)
        results.append(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: v for k, v in os.environ.items() if k.startswith("LLMSERVE_")}
        args.json.write_text(json.dumps({"machine": info, "threads": threads,
                                         "llmserve_environment": settings,
                                         "results": results}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
