"""CPU projections side by side: the bf16 C kernel (kernels/cpu/csrc/gemm_bf16.c), oneDNN, and
weight-only int8 / int4 (kernels/cpu/csrc/gemm_quant.c: the VNNI kernel and the dequantized
bf16 panels), at SmolLM2-135M's projection shapes.

For each projection of the model (qkv, o_proj, gate_up, down: one distinct weight per layer, so
weights come from memory as in a forward pass; lm_head once) and each row count (1 = one decode
stream, 32 = a decode batch, 2048 = a prefill chunk), times oneDNN on its once-reordered weights
(what the engine used before) and the C kernel on its packed weights, alternating, best of
--repeats. With --quant (default) the same shapes quantized (kernels.quant, group --group) run
through the VNNI kernel and the panel route in the same alternation. Up to 32 rows every format
rotates over at least --layers distinct weights and enough to spill the last-level cache twice
(a decode step reads every weight from memory), so none is timed from cache; beyond, where the
products are compute-bound, over one weight (as kernels/cpu/gemm_choice.py times them). Prints
ms and each one's speed relative to the C bf16 kernel, with the load other processes put on the
machine meanwhile; --json saves them.
--chooser instead runs the engine's per-shape choice (kernels/cpu/gemm_choice.py) on weights of
the model's shapes, measured anew (not read from its cache), and prints its table and cost.

    python bench/cpu_gemm.py --rows 1 8 32 256 2048 --json bench/results/cpu_gemm_quant.json
    python bench/cpu_gemm.py --chooser
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (OtherLoad, add_quiet_machine_args, machine_info,  # noqa: E402
                          set_threads, wait_for_quiet)

# SmolLM2-135M: hidden 576, intermediate 1536, 9 + 2 * 3 heads of 64, vocab 49152, 30 layers
SHAPES = {"qkv_proj": (960, 576), "o_proj": (576, 576), "gate_up_proj": (3072, 576),
          "down_proj": (576, 1536), "lm_head": (49152, 576)}


def best_seconds(fn, repeats: int) -> float:
    fn()   # warm-up: first touch of the outputs, thread start
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _copies(count: int, bytes_per_weight: int, cache_bytes: int) -> int:
    """Distinct weights to rotate over: `count`, and enough to spill the cache twice."""
    return max(count, math.ceil(2 * cache_bytes / bytes_per_weight))


def _formats(name: str, layers: int, quant: bool, group: int, cache_bytes: int) -> dict:
    """Format -> (product, weights to rotate over) for one shape, every format over at least
    `layers` distinct weights (lm_head: 1) and enough to spill the cache twice (copies of
    `layers` random ones: the values do not matter to the time, the memory they sit in does);
    cache_bytes 0: `layers` weights only."""
    import torch

    from kernels.cpu import linear as cpu_linear
    from kernels.cpu import quant_linear
    from kernels.quant import quantize

    out_features, in_features = SHAPES[name]
    count = 1 if name == "lm_head" else layers
    generator = torch.Generator().manual_seed(0)
    originals = [torch.randn(out_features, in_features, generator=generator) * 0.05
                 for _ in range(count)]

    def rotation(pack, copy) -> list:
        distinct = [pack(w) for w in originals]
        copies = _copies(count, _nbytes(distinct[0]), cache_bytes)
        return distinct + [copy(distinct[i % count]) for i in range(count, copies)]

    bf16 = rotation(lambda w: w.bfloat16(), torch.clone)
    formats = {"onednn": (cpu_linear.packed_linear, [cpu_linear.prepack(w) for w in bf16]),
               "native": (cpu_linear.native_linear, [cpu_linear.pack_native(w) for w in bf16])}
    del bf16
    if quant:
        for kind in ("int8", "int4"):
            packed = rotation(lambda w, kind=kind: quant_linear.pack(quantize(w, kind, group)),
                              _clone_quant)
            if quant_linear.vnni_available():
                formats[kind] = (quant_linear.vnni_linear, packed)
            formats[f"{kind}_panel"] = (quant_linear.panel_linear, packed)
    return formats


def _nbytes(weight) -> int:
    return weight.nbytes if hasattr(weight, "nbytes") else weight.numel() * weight.element_size()


def _clone_quant(weight):
    """A PackedQuant with its own copy of every tensor."""
    from kernels.cpu.quant_linear import PackedQuant

    offsets = weight.offsets.clone() if weight.offsets is not None else None
    return PackedQuant(weight.kind, weight.group_size, weight.data.clone(),
                       weight.scales.clone(), offsets, weight.unscale, weight.routes)


def bench_shape(name: str, rows: int, layers: int, repeats: int, quant: bool = False,
                group: int = 32, cache_bytes: int = 32 << 20) -> dict[str, float]:
    """ms per call of every format at one shape and row count, alternating (best of repeats,
    twice over), with each one's speed relative to the C bf16 kernel."""
    import torch

    from kernels.cpu import gemm_choice

    out_features, in_features = SHAPES[name]
    # beyond MEMORY_BOUND_ROWS the product is compute-bound: one weight, as the chooser times it
    memory_bound = rows <= gemm_choice.MEMORY_BOUND_ROWS
    formats = _formats(name, layers if memory_bound else 1, quant, group,
                       cache_bytes if memory_bound else 0)
    x = torch.randn(rows, in_features, dtype=torch.bfloat16)
    seconds = {fmt: float("inf") for fmt in formats}
    with OtherLoad() as load:
        for _ in range(2):   # alternate, so drift on the machine hits every format
            for fmt, (product, weights) in formats.items():
                per_call = best_seconds(lambda: [product(x, w) for w in weights], repeats)
                seconds[fmt] = min(seconds[fmt], per_call / len(weights))
    flops = 2.0 * rows * out_features * in_features
    result = {"projection": name, "rows": rows, "weights": len(formats["native"][1]),
              "onednn_weights": len(formats["onednn"][1]),
              "onednn_ms": seconds["onednn"] * 1e3, "native_ms": seconds["native"] * 1e3,
              "onednn_gflops": flops / seconds["onednn"] / 1e9,
              "native_gflops": flops / seconds["native"] / 1e9,
              "speedup": seconds["onednn"] / seconds["native"],
              "other_load_cores": round(load.others_cores, 2)}
    for fmt, (_, weights) in formats.items():
        if fmt in ("onednn", "native"):
            continue
        result[f"{fmt}_ms"] = seconds[fmt] * 1e3
        result[f"{fmt}_vs_bf16"] = seconds["native"] / seconds[fmt]   # > 1: faster than C bf16
        result[f"{fmt}_weights"] = len(weights)
        result[f"{fmt}_gbps"] = weights[0].nbytes / seconds[fmt] / 1e9
    result["native_gbps"] = 2.0 * out_features * in_features / seconds["native"] / 1e9
    return result


def run_chooser(layers: int) -> dict:
    """The engine's GEMM choice on random weights of SmolLM2's shapes, measured anew."""
    import os

    import torch

    from kernels.cpu import gemm_choice
    from kernels.cpu import linear as cpu_linear

    os.environ["LLMSERVE_GEMM_CACHE"] = "0"
    plain = {name.removesuffix("_proj"): [
        torch.randn(*SHAPES[name], dtype=torch.bfloat16) * 0.05
        for _ in range(1 if name == "lm_head" else layers)] for name in SHAPES}
    packed = {name: [cpu_linear.pack_native(w) for w in weights] for name, weights in plain.items()}
    table = cpu_linear.choose_gemms(plain, packed)
    print(gemm_choice.format_table(table))
    def median_ms(times: list[float]) -> float | None:
        return 1e3 * sorted(times)[len(times) // 2] if times else None

    return {name: {"choices": shape.choices(), "buckets": [
        {"rows": b.rows, "native_ms_median": median_ms(b.native_s),
         "onednn_ms_median": median_ms(b.onednn_s), "measured": b.measured}
        for b in shape.buckets]} for name, shape in table.shapes.items()} | {
        "seconds": table.seconds, "noisy": table.noisy(), "truncated": table.truncated()}


QUANT_COLUMNS = ("int8", "int8_panel", "int4", "int4_panel")


def quiet_bench_shape(args: argparse.Namespace, name: str, rows: int,
                      cache_bytes: int) -> dict[str, float]:
    """bench_shape; with --max-others, after an idle moment, again while others were busy."""
    tries = args.retries + 1 if args.max_others is not None else 1
    for attempt in range(tries):
        if args.max_others is not None:
            wait_for_quiet(args.quiet_wait)
        result = bench_shape(name, rows, args.layers, args.repeats, args.quant, args.group,
                             cache_bytes)
        result["attempts"] = attempt + 1
        if args.max_others is None or result["other_load_cores"] <= args.max_others:
            break
    return result


def run_table(args: argparse.Namespace, cache_bytes: int) -> list[dict]:
    """Every shape at every row count: one line each (ms and speed relative to C bf16), and
    a step's sum per row count."""
    quant_head = "".join(f"{name:>12}" for name in QUANT_COLUMNS) if args.quant else ""
    print(f"{'projection':<14}{'rows':>6}{'C bf16 ms':>11}{'oneDNN':>9}{quant_head}"
          f"{'others':>8}   (x: speed relative to the C bf16 kernel; others: busy cores)")
    results = []
    for rows in args.rows:
        totals: dict[str, float] = {}
        for name in SHAPES:
            result = quiet_bench_shape(args, name, rows, cache_bytes)
            results.append(result)
            for key, value in result.items():
                if key.endswith("_ms"):
                    totals[key] = totals.get(key, 0.0) + value
            cells = "".join(f"{result[f'{c}_vs_bf16']:>11.2f}x" if f"{c}_ms" in result
                            else f"{'-':>12}" for c in QUANT_COLUMNS) if args.quant else ""
            print(f"{name:<14}{rows:>6}{result['native_ms']:>11.3f}"
                  f"{result['native_ms'] / result['onednn_ms']:>8.2f}x{cells}"
                  f"{result['other_load_cores']:>8.2f}", flush=True)
        base = totals["native_ms"]
        cells = "".join(f"{base / totals[f'{c}_ms']:>11.2f}x" if f"{c}_ms" in totals
                        else f"{'-':>12}" for c in QUANT_COLUMNS) if args.quant else ""
        print(f"{'all (a step)':<14}{rows:>6}{base:>11.3f}{base / totals['onednn_ms']:>8.2f}x"
              f"{cells}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 256, 2048],
                        help="rows of x (tokens in the step) to time (default: 1 8 32 256 2048)")
    parser.add_argument("--chooser", action="store_true",
                        help="run the engine's per-shape choice instead and print its table")
    parser.add_argument("--layers", type=int, default=30,
                        help="distinct weights per projection, as layers of a model (default 30)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls, best kept (default 5)")
    parser.add_argument("--threads", type=int, default=2, help="OpenMP/torch threads (default 2)")
    parser.add_argument("--quant", action=argparse.BooleanOptionalAction, default=True,
                        help="also time int8 and int4 (the VNNI kernel and the dequantized "
                        "panels); --no-quant: bf16 only")
    parser.add_argument("--group", type=int, default=32, choices=(32, 64),
                        help="quantization group size (default 32, as GGUF's blocks)")
    parser.add_argument("--json", type=Path, help="write the results to this file")
    add_quiet_machine_args(parser, "shape and row count")
    args = parser.parse_args(argv)
    if min(args.rows) < 1 or args.layers < 1 or args.repeats < 1:
        parser.error("--rows, --layers and --repeats must be >= 1")
    threads = set_threads(args.threads)
    from kernels.cpu import linear as cpu_linear

    if not cpu_linear.native_available():
        print("the C bf16 kernel is not available here (needs AVX512-BF16 and a C compiler)")
        return 1
    if args.chooser:
        chosen = run_chooser(args.layers)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"machine": machine_info(), "threads": threads,
                                             "chooser": chosen}, indent=1) + "\n")
            print(f"wrote {args.json}")
        return 0
    from kernels.cpu import gemm_choice

    cache_bytes = gemm_choice.last_level_cache_bytes()
    load_start = os.getloadavg()[0]
    results = run_table(args, cache_bytes)
    info = {**machine_info(), "load_average_1m_at_start": load_start,
            "load_average_1m_at_end": os.getloadavg()[0], "last_level_cache_bytes": cache_bytes}
    print(f"CPU: {info['cpu']}, {threads['OMP_NUM_THREADS']} threads; load average "
          f"{load_start:.2f} at start, {info['load_average_1m_at_end']:.2f} at end")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": info, "threads": threads,
                                         "group_size": args.group, "results": results},
                                        indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
