"""gpu_check steps about the device and the kernels: env + ceilings, the kernel tests on CUDA, the
attention sweep, and attention speed (prefill TFLOP/s vs SDPA, decode GB/s vs the copy rate)."""
from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from bench.gpu_check import REPO_ROOT, CheckFailed, Context, log

# relative Frobenius error vs an fp32 reference computed from the same (rounded) inputs
SWEEP_TOLERANCE = {torch.float32: 2e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
KV_HEADS = 2


def _versions() -> dict:
    import importlib.metadata as md

    found = {}
    for name in ("torch", "triton", "transformers", "safetensors", "numpy", "tokenizers"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = None
    found["cuda"] = torch.version.cuda
    return found


def _driver() -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,name,memory.total,clocks.max.sm",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        return done.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def measure_peaks(device: torch.device) -> dict:
    """HBM copy bandwidth (GB/s, bytes read + written, 4 GiB buffers) and bf16 matmul TFLOP/s."""
    import triton.testing

    src = torch.randn(2**30, device=device)            # 4 GiB, random (not zeros)
    dst = torch.empty_like(src)
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    del src, dst
    n = 8192
    a, b = (torch.randn(n, n, dtype=torch.bfloat16, device=device) for _ in range(2))
    mm_ms = triton.testing.do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
    del a, b
    torch.cuda.empty_cache()
    return {"copy_gbps": 2 * 4 * 2**30 / copy_ms / 1e6, "matmul_tflops": 2 * n**3 / mm_ms / 1e9}


def env_step(ctx: Context) -> dict:
    """Versions, device properties, driver; the measured ceilings the speed steps compare to."""
    report = ctx.shared["report"]
    info = {"versions": _versions(), "platform": platform.platform(), "argv": sys.argv,
            "env": {k: os.environ.get(k) for k in ("TRITON_CACHE_DIR", "CUDA_VISIBLE_DEVICES", "OUT")}}
    if ctx.dry_run:
        ctx.peaks = {"copy_gbps": float("nan"), "matmul_tflops": float("nan")}
        report.doc.update(versions=info["versions"])
        return {**info, "peaks": ctx.peaks, "note": "dry run: no device, no ceilings"}
    props = torch.cuda.get_device_properties(ctx.device)
    device = {"name": props.name, "capability": f"{props.major}.{props.minor}",
              "multiprocessors": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1),
              "driver": _driver()}
    report.doc.update(device=device, versions=info["versions"])
    if props.major < 8:
        raise CheckFailed(f"{props.name} is sm_{props.major}{props.minor}: the kernels need sm_80+")
    ctx.peaks = measure_peaks(ctx.device)
    report.doc["peaks"] = ctx.peaks
    return {**info, "device": device, "peaks": ctx.peaks}


def kernel_tests_step(ctx: Context) -> dict:
    """tests/kernels on CUDA: the compiled kernels against the torch reference."""
    if ctx.dry_run:
        return {"skipped": "dry run: the CPU suite runs these under the interpreter"}
    files = ["tests/kernels/test_triton_attention.py", "tests/kernels/test_triton_elementwise.py",
             "tests/kernels/test_backend.py"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *files],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=230)
    tail = (done.stdout + done.stderr)[-3000:]
    (ctx.out_dir / "kernel_tests.txt").write_text(done.stdout[-200_000:] + done.stderr[-50_000:])
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    if done.returncode != 0:
        raise CheckFailed(f"pytest exit {done.returncode}: {summary}\n{tail}")
    if "skipped" in summary and "passed" not in summary:
        raise CheckFailed(f"kernel tests did not run on CUDA: {summary}")
    return {"summary": summary}


def _sweep_plan(ctx: Context):
    """(dtypes, head dims, groups, prefill batches, decode batches) for this mode."""
    prefill = [([0, 63, 64, 1000], [129, 1, 33, 32]), ([5000], [7]), ([0], [2048])]
    decode = [[1, 63, 64, 65, 128, 129, 4097], [30000], [8192] * 3]
    if ctx.dry_run:
        return [torch.float32], [64], [3], [([3, 0], [5, 17])], [[1, 40]]
    if ctx.quick:
        return [torch.bfloat16, torch.float32], [128], [1, 4], prefill[:2], decode[:2]
    return [torch.bfloat16, torch.float16, torch.float32], [64, 128], [1, 3, 4, 8], prefill, decode


def _poison(device: torch.device) -> None:
    """Leave NaN in the allocator's cached blocks: an output element a kernel skips stays NaN."""
    if device.type == "cuda":
        junk = torch.full((64 << 20,), float("nan"), device=device)
        del junk


def _rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def _reference(fn, q, pb, *args):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):   # fp32 math, no TF32: the ground truth
        return fn(q.float(), pb.k_cache.float(), pb.v_cache.float(), pb.req_to_token, pb.slots, *args)


def kernel_sweep_step(ctx: Context) -> dict:
    """Prefill and decode attention over dtypes x head dims x GQA groups x edge lengths."""
    from kernels import reference
    from kernels.triton.decode_attention import decode_attention
    from kernels.triton.prefill_attention import prefill_attention
    from tests.kernels.helpers import make_pool_batch

    dtypes, head_dims, groups, prefill_cases, decode_cases = _sweep_plan(ctx)
    worst: dict[str, float] = {}
    cases = 0
    for dtype in dtypes:
        for head_dim in head_dims:
            for group in groups:
                q_heads, scale = KV_HEADS * group, head_dim ** -0.5
                for prefix_lens, new_lens in prefill_cases:
                    pb = make_pool_batch(prefix_lens, new_lens, KV_HEADS, head_dim, dtype, ctx.device)
                    q = torch.randn(sum(new_lens), q_heads, head_dim, dtype=dtype, device=ctx.device)
                    _poison(ctx.device)
                    out = prefill_attention(q, pb.k_cache, pb.v_cache, pb.req_to_token, pb.slots,
                                            pb.prefix_lens, pb.cu_new_lens, max(new_lens), scale)
                    ref = _reference(reference.prefill_attention, q, pb, pb.prefix_lens,
                                     pb.cu_new_lens, max(new_lens), scale)
                    cases += _judge("prefill", dtype, head_dim, group, (prefix_lens, new_lens), out, ref, worst)
                for seq_lens in decode_cases:
                    pb = make_pool_batch([n - 1 for n in seq_lens], [1] * len(seq_lens), KV_HEADS,
                                         head_dim, dtype, ctx.device)
                    q = torch.randn(len(seq_lens), q_heads, head_dim, dtype=dtype, device=ctx.device)
                    _poison(ctx.device)
                    out = decode_attention(q, pb.k_cache, pb.v_cache, pb.req_to_token, pb.slots,
                                           pb.seq_lens, scale, max(seq_lens))
                    ref = _reference(reference.decode_attention, q, pb, pb.seq_lens, scale, max(seq_lens))
                    cases += _judge("decode", dtype, head_dim, group, seq_lens, out, ref, worst)
    return {"cases": cases, "worst_rel_error": worst,
            "tolerance": {str(k).removeprefix("torch."): v for k, v in SWEEP_TOLERANCE.items()}}


def _judge(kind: str, dtype, head_dim: int, group: int, shape, out, ref, worst: dict) -> int:
    error = _rel_error(out, ref)
    key = f"{kind} {str(dtype).removeprefix('torch.')}"
    worst[key] = max(worst.get(key, 0.0), error)
    if not error <= SWEEP_TOLERANCE[dtype]:
        raise CheckFailed(f"{kind} attention {dtype} d={head_dim} group={group} {shape}: relative "
                          f"error {error:.3g} > {SWEEP_TOLERANCE[dtype]} (inf: NaN/inf or unwritten)")
    return 1


def _timed(fn, ctx: Context, graph: bool = False) -> float:
    """Median ms: do_bench (events) on CUDA, optionally replayed as a CUDA graph; one call on CPU."""
    if ctx.dry_run:
        import time

        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton.testing

    if graph:
        return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _contiguous_pool(batch: int, ctx_len: int, kv_heads: int, head_dim: int, dtype, device):
    """K/V pools with request b's tokens in rows [b*ctx, (b+1)*ctx) and its table row pointing there."""
    rows = batch * ctx_len
    k = torch.randn(rows + 1, kv_heads, head_dim, dtype=dtype, device=device)
    v = torch.randn_like(k)
    table = torch.arange(rows, dtype=torch.int32, device=device).view(batch, ctx_len)
    slots = torch.arange(batch, dtype=torch.int32, device=device)
    return k, v, table, slots


def prefill_perf_step(ctx: Context) -> dict:
    """Prefill attention TFLOP/s (Llama-3-8B heads, bf16) vs SDPA on contiguous K/V."""
    import torch.nn.functional as F

    from kernels.triton.prefill_attention import prefill_attention

    q_heads, kv_heads, d = (32, 8, 128) if not ctx.dry_run else (4, 2, 64)
    cases = [("8k_causal", 0, 8192), ("2k_after_30k", 30720, 2048)] if not ctx.dry_run else [("tiny", 16, 8)]
    dtype = torch.bfloat16 if not ctx.dry_run else torch.float32
    results = {}
    for name, prefix, new in cases:
        k, v, table, slots = _contiguous_pool(1, prefix + new, kv_heads, d, dtype, ctx.device)
        q = torch.randn(new, q_heads, d, dtype=dtype, device=ctx.device)
        lens = torch.tensor([prefix], dtype=torch.int32, device=ctx.device)
        cu = torch.tensor([0, new], dtype=torch.int32, device=ctx.device)
        ours = lambda: prefill_attention(q, k, v, table, slots, lens, cu, new, d ** -0.5)  # noqa: E731
        flops = 4 * d * q_heads * (new * prefix + new * (new + 1) / 2)
        qs = q.transpose(0, 1).unsqueeze(0).contiguous()              # [1, heads, new, d]
        # K/V repeated to every query head, contiguous: SDPA's fastest (flash) path applies
        ks, vs = (t[:prefix + new].repeat_interleave(q_heads // kv_heads, dim=1).transpose(0, 1)
                  .unsqueeze(0).contiguous() for t in (k, v))       # [1, heads, ctx, d]
        causal = prefix == 0
        sdpa = lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)  # noqa: E731
        sdpa_flops = flops if causal else 4 * d * q_heads * new * (prefix + new)
        ours_ms, sdpa_ms = _timed(ours, ctx), _timed(sdpa, ctx)
        entry = {"ours_ms": ours_ms, "sdpa_ms": sdpa_ms, "ours_tflops": flops / ours_ms / 1e9,
                 "sdpa_tflops": sdpa_flops / sdpa_ms / 1e9,
                 "sdpa_note": "is_causal" if causal else "no mask over the whole context (upper bound)"}
        if causal:
            diff = (ours().float() - sdpa().squeeze(0).transpose(0, 1).float()).abs().max()
            entry["max_abs_diff_vs_sdpa"] = float(diff)
        entry["ratio_vs_sdpa"] = entry["ours_tflops"] / entry["sdpa_tflops"]
        results[name] = entry
        log.info("prefill %s: %.1f TFLOP/s, SDPA %.1f (%.0f%%)", name, entry["ours_tflops"],
                 entry["sdpa_tflops"], 100 * entry["ratio_vs_sdpa"])
        if not ctx.dry_run:
            ctx.target(f"prefill_{name}_vs_sdpa", entry["ratio_vs_sdpa"], 0.5)
        del k, v, q, qs, ks, vs
    return results


def decode_perf_step(ctx: Context) -> dict:
    """Decode attention GB/s (K+V bytes + table) vs the measured copy bandwidth."""
    from kernels.triton.decode_attention import decode_attention

    q_heads, kv_heads, d = (32, 8, 128) if not ctx.dry_run else (4, 2, 64)
    dtype = torch.bfloat16 if not ctx.dry_run else torch.float32
    if ctx.dry_run:
        grid = [(2, 40)]
    elif ctx.quick:
        grid = [(64, 8192)]
    else:
        grid = [(b, n) for b in (1, 64) for n in (1024, 8192, 32768)]
    copy_gbps = ctx.peaks.get("copy_gbps", math.nan)
    results = {}
    for batch, ctx_len in grid:
        k, v, table, slots = _contiguous_pool(batch, ctx_len, kv_heads, d, dtype, ctx.device)
        q = torch.randn(batch, q_heads, d, dtype=dtype, device=ctx.device)
        seq_lens = torch.full((batch,), ctx_len, dtype=torch.int32, device=ctx.device)
        fn = lambda: decode_attention(q, k, v, table, slots, seq_lens, d ** -0.5, ctx_len)  # noqa: E731
        nbytes = batch * ctx_len * (2 * kv_heads * d * k.element_size() + 4)
        eager_ms, graph_ms = _timed(fn, ctx), _timed(fn, ctx, graph=not ctx.dry_run)
        gbps = nbytes / graph_ms / 1e6
        name = f"b{batch}_ctx{ctx_len}"
        results[name] = {"eager_ms": eager_ms, "graph_ms": graph_ms, "gbps": gbps,
                         "fraction_of_copy": gbps / copy_gbps if copy_gbps == copy_gbps else None}
        log.info("decode %s: %.3f ms (graph) %.0f GB/s = %.0f%% of copy", name, graph_ms, gbps,
                 100 * gbps / copy_gbps if copy_gbps == copy_gbps else float("nan"))
        if (batch, ctx_len) == (64, 8192) and not ctx.dry_run:
            ctx.target("decode_b64_ctx8k_fraction_of_hbm", gbps / copy_gbps, 0.60)
        del k, v, table
    if not ctx.dry_run:
        torch.cuda.empty_cache()
    return {"copy_gbps": copy_gbps, "cases": results}
