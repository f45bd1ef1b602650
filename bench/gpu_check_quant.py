"""gpu_check steps for the Triton W8A16 / W4A16 GEMM (kernels/triton/quant_gemm.py): its output
against the torch oracle over formats x groups x dtypes x row counts at odd shapes, and its speed
against bf16 F.linear at Llama-3-8B's projections (GB/s vs the copy rate at decode rows)."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import torch

from bench.gpu_check import REPO_ROOT, CheckFailed, Context, log

# relative Frobenius error vs the fp32 oracle: bf16/fp16 also round each dequantized weight
QUANT_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
FORMATS = ("int8", "q8_0", "int4", "q4_1")   # tests/kernels/test_triton_quant_gemm.make_weight
LLAMA3_8B_PROJECTIONS = dict(hidden=4096, intermediate=14336, q_heads=32, kv_heads=8, head_dim=128)


def _sweep_plan(ctx: Context):
    """(dtypes, groups, row counts, out_features, in_features) for this mode: N is no multiple of
    any tile, K an odd number of 64-groups (so of 32-groups, twice that)."""
    if ctx.dry_run:
        return [torch.float32], [32], [1, 17], 40, 96
    rows = [1, 33, 300] if ctx.quick else [1, 7, 16, 17, 64, 65, 300, 2048]
    dtypes = [torch.bfloat16] if ctx.quick else [torch.bfloat16, torch.float16, torch.float32]
    return dtypes, [32, 64], rows, 1000, 64 * 67


def _poison(device: torch.device) -> None:
    """NaN in the allocator's cached blocks: an output element the kernel skips stays NaN."""
    if device.type == "cuda":
        junk = torch.full((64 << 20,), float("nan"), device=device)
        del junk


def quant_gemm_step(ctx: Context) -> dict:
    """The quantized GEMM vs kernels.quant.quantized_linear: every format (int8, GGUF-Q8_0-like,
    symmetric int4, GGUF-Q4_1-like), group 32/64, dtype and row count (decode, split-K edges,
    prefill), with and without a bias; outputs poisoned first."""
    from kernels import quant
    from kernels.triton.quant_gemm import quantized_linear
    from kernels.triton.quant_pack import pack
    from tests.kernels.test_triton_quant_gemm import make_weight

    dtypes, groups, row_counts, out_features, in_features = _sweep_plan(ctx)
    worst: dict[str, float] = {}
    cases = 0
    for fmt in FORMATS if not ctx.dry_run else FORMATS[2:3]:
        for group in groups:
            weight = make_weight(fmt, out_features, in_features, group).to(ctx.device)
            packed = pack(weight)
            with_bias = fmt == "q8_0"   # Qwen2's qkv: a bias (one more variant per config)
            for dtype in dtypes:
                for rows in row_counts:
                    x = torch.randn(rows, in_features, device=ctx.device).to(dtype)
                    bias = torch.randn(out_features, device=ctx.device).to(dtype) if with_bias else None
                    _poison(ctx.device)
                    out = quantized_linear(x, packed, bias)
                    ref = quant.quantized_linear(x.float(), weight, None if bias is None else bias.float())
                    error = _rel_error(out, ref)
                    key = f"{fmt} {str(dtype).removeprefix('torch.')}"
                    worst[key] = max(worst.get(key, 0.0), error)
                    if not error <= QUANT_TOLERANCE[dtype]:
                        raise CheckFailed(f"quantized GEMM {fmt} group {group} {dtype} rows={rows} "
                                          f"[{out_features} x {in_features}]: relative error "
                                          f"{error:.3g} > {QUANT_TOLERANCE[dtype]} (inf: NaN/unwritten)")
                    cases += 1
    result = {"cases": cases, "worst_rel_error": worst,
              "tolerance": {str(k).removeprefix("torch."): v for k, v in QUANT_TOLERANCE.items()}}
    if not ctx.dry_run and not ctx.quick:
        result["tests"] = _backend_tests_on_cuda(ctx)
    return result


def _backend_tests_on_cuda(ctx: Context) -> str:
    """The Triton backend on a tiny quantized model vs the torch ops with the oracle (and the
    wrapper's checks, strided rows, forced splits) from tests/kernels/test_triton_quant_gemm.py,
    compiled on CUDA; the rest of that file is this step's sweep at larger shapes."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           "tests/kernels/test_triton_quant_gemm.py", "-k",
                           "backend or strided or rejects"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=150)
    (ctx.out_dir / "quant_gemm_tests.txt").write_text(done.stdout[-100_000:] + done.stderr[-20_000:])
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    if done.returncode != 0 or "passed" not in summary:
        tail = (done.stdout + done.stderr)[-3000:]
        raise CheckFailed(f"pytest exit {done.returncode}: {summary}\n{tail}")
    return summary


def _rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def _timed(fn, ctx: Context) -> float:
    """Median ms: do_bench on CUDA (L2 flushed between calls: weights come from HBM, as in a
    decode step); one call in the dry run."""
    if ctx.dry_run:
        import time

        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _perf_plan(ctx: Context):
    """(projections, row counts) for this mode."""
    from bench.quant_gemm_bench import ROW_COUNTS, projections

    if ctx.dry_run:
        return projections(96, 64, 6, 2, 16)[::2], (1,)   # qkv and gate_up, tiny
    shapes = projections(**LLAMA3_8B_PROJECTIONS)
    if ctx.quick:
        return [p for p in shapes if p.name in ("gate_up", "down")], (1, 2048)
    return shapes, ROW_COUNTS


def quant_perf_step(ctx: Context) -> dict:
    """W8A16 / W4A16 GEMM vs bf16 F.linear on the same weight at Llama-3-8B's projections: GB/s
    (and its fraction of the copy rate) at 1 and 16 rows, TFLOP/s above, speedup over bf16."""
    from bench.quant_gemm_bench import cases

    shapes, row_counts = _perf_plan(ctx)
    dtype = torch.bfloat16
    copy_gbps = ctx.peaks.get("copy_gbps", math.nan)
    results: dict[str, dict] = {}
    for case in cases(shapes, row_counts, dtype, ctx.device):
        ours_ms, bf16_ms = _timed(case.ours, ctx), _timed(case.bf16, ctx)
        entry = {"ms": ours_ms, "bf16_ms": bf16_ms, "speedup": bf16_ms / ours_ms,
                 "gbps": case.ours_bytes / ours_ms / 1e6, "bf16_gbps": case.bf16_bytes / bf16_ms / 1e6,
                 "tflops": case.flops / ours_ms / 1e9, "bf16_tflops": case.flops / bf16_ms / 1e9,
                 "rel_error": case.rel_error}
        entry["fraction_of_copy"] = entry["gbps"] / copy_gbps if copy_gbps == copy_gbps else None
        name = f"{case.label.replace(' ', '_')}_m{case.rows}"
        results[name] = entry
        log.info("%s: %.4f ms (%.0f GB/s, %.1f TFLOP/s), bf16 %.4f ms: %.2fx", name, ours_ms,
                 entry["gbps"], entry["tflops"], bf16_ms, entry["speedup"])
    if not ctx.dry_run:
        for kind, rows, goal in (("w4a16", 1, 2.0), ("w8a16", 1, 1.4), ("w4a16", 2048, 0.5)):
            speedups = [entry["speedup"] for name, entry in results.items()
                        if name.startswith(kind) and name.endswith(f"_m{rows}")]
            ctx.target(f"{kind}_m{rows}_speedup_vs_bf16", _geomean(speedups), goal, "x")
        gate_up = results.get("w4a16_gate_up_m1", {}).get("fraction_of_copy")
        if gate_up is not None:
            ctx.target("w4a16_gate_up_m1_fraction_of_copy", gate_up, 0.5)
        torch.cuda.empty_cache()
    return {"copy_gbps": copy_gbps, "dtype": str(dtype), "group_size": 32, "cases": results}


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else math.nan
