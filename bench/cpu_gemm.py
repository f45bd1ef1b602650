"""bf16 projections on CPU: the C kernel (kernels/cpu/csrc/gemm_bf16.c) against oneDNN, side by side.

For each projection of the model (qkv, o_proj, gate_up, down: one distinct weight per layer, so
weights come from memory as in a forward pass; lm_head once) and each row count (1 = one decode
stream, 32 = a decode batch, 2048 = a prefill chunk), times oneDNN on its once-reordered weights
(what the engine used before) and the C kernel on its packed weights, alternating, best of
--repeats. Prints ms, GFLOP/s and the ratio; --json saves them.
--chooser instead runs the engine's per-shape choice (kernels/cpu/gemm_choice.py) on weights of
the model's shapes, measured anew (not read from its cache), and prints its table and cost.

    python bench/cpu_gemm.py --rows 1 8 32 256 2048 --json bench/results/cpu_gemm.json
    python bench/cpu_gemm.py --chooser
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine_info, set_threads  # noqa: E402

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


def bench_shape(name: str, rows: int, layers: int, repeats: int) -> dict[str, float]:
    import torch

    from kernels.cpu import linear as cpu_linear

    out_features, in_features = SHAPES[name]
    count = 1 if name == "lm_head" else layers
    weights = [torch.randn(out_features, in_features, dtype=torch.bfloat16) * 0.05
               for _ in range(count)]
    onednn = [cpu_linear.prepack(w) for w in weights]
    native = [cpu_linear.pack_native(w) for w in weights]
    x = torch.randn(rows, in_features, dtype=torch.bfloat16)
    seconds = {"onednn": float("inf"), "native": float("inf")}
    for _ in range(2):   # alternate, so drift on the machine hits both
        seconds["onednn"] = min(seconds["onednn"], best_seconds(
            lambda: [cpu_linear.packed_linear(x, w) for w in onednn], repeats))
        seconds["native"] = min(seconds["native"], best_seconds(
            lambda: [cpu_linear.native_linear(x, w) for w in native], repeats))
    flops = 2.0 * rows * out_features * in_features * count
    return {"projection": name, "rows": rows, "weights": count,
            "onednn_ms": seconds["onednn"] * 1e3, "native_ms": seconds["native"] * 1e3,
            "onednn_gflops": flops / seconds["onednn"] / 1e9,
            "native_gflops": flops / seconds["native"] / 1e9,
            "speedup": seconds["onednn"] / seconds["native"]}


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
    parser.add_argument("--json", type=Path, help="write the results to this file")
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
    results = []
    print(f"{'projection':<14}{'rows':>6}{'oneDNN ms':>11}{'C ms':>9}{'oneDNN GF/s':>13}"
          f"{'C GF/s':>9}{'C speedup':>11}")
    for rows in args.rows:
        totals = {"onednn_ms": 0.0, "native_ms": 0.0}
        for name in SHAPES:
            result = bench_shape(name, rows, args.layers, args.repeats)
            results.append(result)
            totals = {key: totals[key] + result[key] for key in totals}
            print(f"{name:<14}{rows:>6}{result['onednn_ms']:>11.2f}{result['native_ms']:>9.2f}"
                  f"{result['onednn_gflops']:>13.0f}{result['native_gflops']:>9.0f}"
                  f"{result['speedup']:>10.2f}x", flush=True)
        print(f"{'all (a step)':<14}{rows:>6}{totals['onednn_ms']:>11.2f}{totals['native_ms']:>9.2f}"
              f"{'':>22}{totals['onednn_ms'] / totals['native_ms']:>10.2f}x", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine_info(), "threads": threads,
                                         "results": results}, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
