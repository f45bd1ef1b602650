"""Benchmark each Triton kernel against its torch twin at serving shapes on CUDA.

Reports time (triton.testing.do_bench, median), achieved GB/s (memory-bound kernels) or TFLOP/s
(prefill attention) and the fraction of this device's measured peak: a 1 GiB device-to-device copy
for bandwidth, an 8192^3 bf16 matmul for compute. Prefill attention is also compared with
torch.nn.functional.scaled_dot_product_attention on contiguous K/V (no pool, no prefix). The
W8A16 / W4A16 GEMMs (kernels/triton/quant_gemm.py, group 32) run every projection of the model at
1, 16, 256 and 2048 rows against bf16 F.linear on the same weight: GB/s at 1 and 16 rows (decode
reads every weight byte once), TFLOP/s above, and the speedup over bf16 (bench/quant_gemm_bench.py).

    python bench/kernels.py [--model smollm2-135m|llama3-8b|all] [--json bench/results/kernels.json]
    python bench/kernels.py --interpret      # tiny shapes through the Triton interpreter (CPU smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@dataclass(slots=True)
class Shape:
    """Model dimensions and the serving batch a benchmark uses."""

    name: str
    hidden: int
    intermediate: int
    q_heads: int
    kv_heads: int
    head_dim: int
    prefill_new: list[int]  # new tokens per request in the prefill batch
    prefill_prefix: list[int]  # cached prefix per request in the prefill-with-prefix batch
    decode_seq_lens: list[int]  # context length per request in the decode batch


SHAPES = {
    "smollm2-135m": Shape("smollm2-135m", 576, 1536, 9, 3, 64, [1024] * 4, [1536] * 4, [1024] * 32 + [2048] * 32),
    "llama3-8b": Shape("llama3-8b", 4096, 14336, 32, 8, 128, [1024] * 4, [1536] * 4, [1024] * 32 + [2048] * 32),
}
TINY = Shape("tiny", 96, 80, 6, 2, 64, [19, 7], [5, 0], [3, 40, 17])


@dataclass(slots=True)
class Result:
    """One timed implementation of one kernel at one shape."""

    kernel: str
    shape: str
    impl: str
    ms: float
    gbps: float | None = None
    tflops: float | None = None
    peak_fraction: float | None = None
    max_abs_diff: float | None = None  # vs the torch reference output
    note: str = ""
    extra: dict = field(default_factory=dict)


def bench_ms(fn: Callable[[], object], on_cuda: bool) -> float:
    """Median milliseconds per call: do_bench on CUDA, a short wall-clock loop in the interpreter."""
    if on_cuda:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def measure_peaks(on_cuda: bool) -> dict[str, float]:
    """Measured copy bandwidth (GB/s, read + write) and bf16 matmul rate (TFLOP/s)."""
    import torch

    if not on_cuda:
        return {"copy_gbps": float("nan"), "matmul_tflops": float("nan")}
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = bench_ms(lambda: dst.copy_(src), True)
    n = 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    mm_ms = bench_ms(lambda: a @ b, True)
    del src, dst, a, b
    torch.cuda.empty_cache()
    return {"copy_gbps": 2 * 2**30 / copy_ms / 1e6, "matmul_tflops": 2 * n**3 / mm_ms / 1e9}


class Bench:
    """Collects results for one shape and prints them as they come."""

    def __init__(self, shape: Shape, dtype, device, peaks: dict[str, float], ops: dict):
        self.shape, self.dtype, self.device, self.peaks, self.ops = shape, dtype, device, peaks, ops
        self.on_cuda = device.type == "cuda"
        self.results: list[Result] = []

    def add(self, kernel: str, impl: str, fn: Callable[[], object], *, bytes_moved: float = 0.0,
            flops: float = 0.0, diff: float | None = None, note: str = "") -> None:
        ms = bench_ms(fn, self.on_cuda)
        result = Result(kernel, self.shape.name, impl, ms, max_abs_diff=diff, note=note)
        if bytes_moved:
            result.gbps = bytes_moved / ms / 1e6
            result.peak_fraction = result.gbps / self.peaks["copy_gbps"]
        if flops:
            result.tflops = flops / ms / 1e9
            result.peak_fraction = result.tflops / self.peaks["matmul_tflops"]
        self.results.append(result)
        rate = f"{result.gbps:8.1f} GB/s" if result.gbps else f"{result.tflops or 0:8.1f} TF/s"
        frac = f"{result.peak_fraction:6.1%}" if result.peak_fraction == result.peak_fraction else "   n/a"
        diff_text = f"  maxdiff {diff:.2e}" if diff is not None else ""
        print(f"  {kernel:22s} {impl:8s} {ms:9.4f} ms {rate}  {frac} of peak{diff_text} {note}")

    def pair(self, kernel: str, triton_fn, torch_fn, **cost) -> None:
        """Time the Triton kernel and its torch twin; report their max output difference."""
        expected, actual = torch_fn(), triton_fn()
        diff = _max_diff(actual, expected)
        self.add(kernel, "triton", triton_fn, diff=diff, **cost)
        self.add(kernel, "torch", torch_fn, **cost)


def _max_diff(actual, expected) -> float | None:
    if actual is None or expected is None:
        return None
    if isinstance(actual, tuple):
        return max(_max_diff(a, e) for a, e in zip(actual, expected))
    return float((actual.float() - expected.float()).abs().max())


def bench_elementwise(b: Bench) -> None:
    """rms_norm, rope, silu_and_mul and store_kv over the prefill token count."""
    import torch

    from kernels import reference

    s, dt, dev, elem = b.shape, b.dtype, b.device, torch.finfo(b.dtype).bits // 8
    tokens = sum(s.prefill_new)
    x = torch.randn(tokens, s.hidden, dtype=dt, device=dev)
    residual = torch.randn_like(x)
    weight = torch.randn(s.hidden, dtype=dt, device=dev)
    b.pair("rms_norm+residual", lambda: b.ops["rms_norm"](x, weight, 1e-5, residual),
           lambda: reference.rms_norm(x, weight, 1e-5, residual), bytes_moved=4 * x.numel() * elem)

    cos_sin = reference.build_rope_cache(s.head_dim, 8192, 10000.0, None, dev)
    q = torch.randn(tokens, s.q_heads, s.head_dim, dtype=dt, device=dev)
    k = torch.randn(tokens, s.kv_heads, s.head_dim, dtype=dt, device=dev)
    positions = torch.randint(0, 8192, (tokens,), device=dev)
    rope_bytes = 2 * (q.numel() + k.numel()) * elem + tokens * s.head_dim * 4
    q_out, k_out, q_ref, k_ref = q.clone(), k.clone(), q.clone(), k.clone()
    b.ops["apply_rope"](q_out, k_out, positions, cos_sin)
    reference.apply_rope(q_ref, k_ref, positions, cos_sin)
    diff = _max_diff((q_out, k_out), (q_ref, k_ref))
    b.add("apply_rope", "triton", lambda: b.ops["apply_rope"](q, k, positions, cos_sin), bytes_moved=rope_bytes,
          diff=diff)
    b.add("apply_rope", "torch", lambda: reference.apply_rope(q, k, positions, cos_sin), bytes_moved=rope_bytes)

    gate_up = torch.randn(tokens, 2 * s.intermediate, dtype=dt, device=dev)
    b.pair("silu_and_mul", lambda: b.ops["silu_and_mul"](gate_up), lambda: reference.silu_and_mul(gate_up),
           bytes_moved=1.5 * gate_up.numel() * elem)

    capacity = 2 * tokens
    k_cache = torch.zeros(capacity, s.kv_heads, s.head_dim, dtype=dt, device=dev)
    v_cache = torch.zeros_like(k_cache)
    rows = torch.randperm(capacity, device=dev)[:tokens]
    kv_bytes = 4 * k.numel() * elem + rows.numel() * 8
    b.ops["store_kv"](k_cache, v_cache, k, k, rows)
    diff = _max_diff((k_cache[rows], v_cache[rows]), (k, k))
    b.add("store_kv", "triton", lambda: b.ops["store_kv"](k_cache, v_cache, k, k, rows), bytes_moved=kv_bytes,
          diff=diff)
    b.add("store_kv", "torch", lambda: reference.store_kv(k_cache, v_cache, k, k, rows), bytes_moved=kv_bytes)


def _pool(s: Shape, seq_lens: list[int], dtype, device):
    """Random K/V pool; each request's tokens in shuffled rows; returns (k, v, table, slots)."""
    import torch

    capacity = sum(seq_lens) + 64
    k_cache = torch.randn(capacity, s.kv_heads, s.head_dim, dtype=dtype, device=device)
    v_cache = torch.randn_like(k_cache)
    table = torch.zeros(len(seq_lens), max(seq_lens), dtype=torch.int32, device=device)
    rows = torch.randperm(capacity, device=device).to(torch.int32)
    offset = 0
    for r, length in enumerate(seq_lens):
        table[r, :length] = rows[offset : offset + length]
        offset += length
    slots = torch.arange(len(seq_lens), dtype=torch.int32, device=device)
    return k_cache, v_cache, table, slots


def _causal_flops(s: Shape, prefix_lens: list[int], new_lens: list[int]) -> float:
    """QK^T and PV over visible (query, key) pairs: 4 * q_heads * head_dim per pair."""
    pairs = sum(n * p + n * (n + 1) / 2 for p, n in zip(prefix_lens, new_lens))
    return 4.0 * s.q_heads * s.head_dim * pairs


def bench_prefill(b: Bench, prefix_lens: list[int], label: str) -> None:
    import torch
    import torch.nn.functional as F

    from kernels import reference

    s, dt, dev = b.shape, b.dtype, b.device
    new_lens = s.prefill_new
    seq_lens = [p + n for p, n in zip(prefix_lens, new_lens)]
    k_cache, v_cache, table, slots = _pool(s, seq_lens, dt, dev)
    q = torch.randn(sum(new_lens), s.q_heads, s.head_dim, dtype=dt, device=dev)
    prefix = torch.tensor(prefix_lens, dtype=torch.int32, device=dev)
    cu = torch.tensor([0] + new_lens, dtype=torch.int32, device=dev).cumsum(0).to(torch.int32)
    args = (q, k_cache, v_cache, table, slots, prefix, cu, max(new_lens), s.head_dim**-0.5)
    flops = _causal_flops(s, prefix_lens, new_lens)
    b.pair(f"prefill_attn{label}", lambda: b.ops["prefill_attention"](*args),
           lambda: reference.prefill_attention(*args), flops=flops)
    if any(prefix_lens) or len(set(new_lens)) != 1:
        return
    # SDPA baseline: same work on contiguous [batch, heads, len, d] tensors (no pool, no table)
    batch, length = len(new_lens), new_lens[0]
    q_sdpa = q.view(batch, length, s.q_heads, s.head_dim).transpose(1, 2)
    k_sdpa = torch.randn(batch, s.kv_heads, length, s.head_dim, dtype=dt, device=dev)
    v_sdpa = torch.randn_like(k_sdpa)
    sdpa = lambda: F.scaled_dot_product_attention(q_sdpa, k_sdpa, v_sdpa, is_causal=True,  # noqa: E731
                                                  enable_gqa=True)
    b.add(f"prefill_attn{label}", "sdpa", sdpa, flops=flops, note="(contiguous K/V)")


def bench_decode(b: Bench) -> None:
    import torch

    from kernels import reference

    s, dt, dev, elem = b.shape, b.dtype, b.device, torch.finfo(b.dtype).bits // 8
    seq_lens = s.decode_seq_lens
    k_cache, v_cache, table, slots = _pool(s, seq_lens, dt, dev)
    q = torch.randn(len(seq_lens), s.q_heads, s.head_dim, dtype=dt, device=dev)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=dev)
    args = (q, k_cache, v_cache, table, slots, lens, s.head_dim**-0.5, max(seq_lens))
    kv_bytes = 2 * sum(seq_lens) * s.kv_heads * s.head_dim * elem + sum(seq_lens) * 4 + 2 * q.numel() * elem
    b.pair("decode_attn", lambda: b.ops["decode_attention"](*args), lambda: reference.decode_attention(*args),
           bytes_moved=kv_bytes)


def bench_quant_gemm(b: Bench) -> None:
    """W8A16 / W4A16 Triton GEMM vs bf16 F.linear (cuBLAS) on the same weight, per projection
    and row count (the interpreter: 1 and 16 rows, projections whose K splits into groups)."""
    from bench.quant_gemm_bench import ROW_COUNTS, cases, projections

    s = b.shape
    shapes = projections(s.hidden, s.intermediate, s.q_heads, s.kv_heads, s.head_dim)
    for case in cases(shapes, ROW_COUNTS if b.on_cuda else (1, 16), b.dtype, b.device):
        name = f"{case.label} m{case.rows}"
        decode = case.rows <= 16   # bandwidth-bound: GB/s; above, math-bound: TFLOP/s
        ours_cost = {"bytes_moved": case.ours_bytes} if decode else {"flops": case.flops}
        bf16_cost = {"bytes_moved": case.bf16_bytes} if decode else {"flops": case.flops}
        b.add(name, "triton", case.ours, diff=case.max_abs_diff, **ours_cost)
        b.add(name, "torch", case.bf16, note=f"(F.linear, {str(b.dtype).removeprefix('torch.')})",
              **bf16_cost)
        ours, bf16 = b.results[-2], b.results[-1]
        ours.extra = {"rows": case.rows, "speedup_vs_f_linear": bf16.ms / ours.ms,
                      "rel_error": case.rel_error}
        print(f"  {'':22s} speedup over F.linear {bf16.ms / ours.ms:5.2f}x, rel error "
              f"{case.rel_error:.1e}")


def _finite(value):
    """NaN (no measured peak in the interpreter) becomes null, so the file is strict JSON."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def _versions() -> dict[str, str]:
    import torch
    import triton

    return {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": str(torch.version.cuda)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=[*SHAPES, "all"], default="all")
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--json", type=Path, help="write results (with device and versions) to this file")
    parser.add_argument("--interpret", action="store_true", help="tiny shapes in the Triton interpreter on CPU")
    args = parser.parse_args(argv)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch

    if not args.interpret and not torch.cuda.is_available():
        print("bench/kernels.py: no CUDA device here; nothing to benchmark "
              "(use --interpret for a tiny CPU smoke run of the Triton kernels).")
        return 0
    from kernels.backend import get_ops

    device = torch.device("cpu" if args.interpret else "cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    ops_namespace = get_ops("triton")
    ops = {name: getattr(ops_namespace, name) for name in
           ("rms_norm", "apply_rope", "silu_and_mul", "store_kv", "prefill_attention", "decode_attention")}
    peaks = measure_peaks(device.type == "cuda")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    print(f"{device_name}: copy {peaks['copy_gbps']:.0f} GB/s, bf16 matmul {peaks['matmul_tflops']:.0f} TFLOP/s")
    shapes = [TINY] if args.interpret else (list(SHAPES.values()) if args.model == "all" else [SHAPES[args.model]])
    results: list[Result] = []
    for shape in shapes:
        print(f"[{shape.name}] dtype={dtype}")
        bench = Bench(shape, dtype, device, peaks, ops)
        bench_elementwise(bench)
        bench_prefill(bench, [0] * len(shape.prefill_new), "")
        bench_prefill(bench, shape.prefill_prefix, "+prefix")
        bench_decode(bench)
        bench_quant_gemm(bench)
        results.extend(bench.results)
    if args.json:
        payload = {"device": device_name, "versions": _versions(), "command": " ".join(sys.argv),
                   "dtype": str(dtype), "peaks": peaks, "shapes": [asdict(s) for s in shapes],
                   "results": [asdict(r) for r in results]}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_finite(payload), indent=2, allow_nan=False) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
