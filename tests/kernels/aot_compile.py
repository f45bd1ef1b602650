"""Ahead-of-time compile every Triton kernel for sm_90 (H100) with the ptxas bundled in the Triton wheel.

Needs no GPU: it catches what the CPU interpreter cannot (unsupported ops, dot shapes, layouts) and
checks that the launch configurations the wrappers pick fit in an A100's shared memory.
Run in a process where Triton is in compiled mode: `python -m tests.kernels.aot_compile`.
"""

from __future__ import annotations

import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels.triton.launch import interpret_mode

A100_SHARED_BYTES = 166_912  # the smallest datacenter-GPU limit the serving configs must fit
TYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
INDEX_POINTERS = {"req_to_token_ptr": "i32", "slots_ptr": "i32", "prefix_lens_ptr": "i32",
                  "cu_new_lens_ptr": "i32", "seq_lens_ptr": "i32", "positions_ptr": "i64", "rows_ptr": "i64"}
FP32_POINTERS = {"cos_sin_ptr", "partial_out_ptr", "partial_lse_ptr"}
FP32_SCALARS = {"eps", "qk_scale"}


def _signature(kernel, dtype: torch.dtype, constexprs: dict) -> dict[str, str]:
    """Triton type strings for each argument, from the kernels' naming convention."""
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in INDEX_POINTERS:
            signature[name] = "*" + INDEX_POINTERS[name]
        elif name in FP32_POINTERS:
            signature[name] = "*fp32"
        elif name.endswith("_ptr"):
            signature[name] = "*" + TYPE_NAMES[dtype]
        elif name in FP32_SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def compile_one(kernel, dtype: torch.dtype, constexprs: dict, num_warps: int = 4, num_stages: int = 2) -> int:
    """Compile to a cubin for sm_90 and return the shared memory it needs, in bytes."""
    source = ASTSource(kernel, _signature(kernel, dtype, constexprs), constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    if not compiled.asm.get("cubin"):
        raise RuntimeError(f"{kernel.__name__}: no cubin produced")
    shared = compiled.metadata.shared
    if shared > A100_SHARED_BYTES:
        raise RuntimeError(f"{kernel.__name__} {constexprs}: needs {shared} B of shared memory")
    return shared


def compile_all() -> list[str]:
    """Compile the elementwise kernels and the attention kernels at the wrappers' GPU configurations."""
    from kernels.triton import decode_attention, prefill_attention, rmsnorm, rope, silu_mul, store_kv

    lines = []
    for dtype in (torch.bfloat16, torch.float32):
        jobs = [
            (rmsnorm._rms_norm_kernel, {"HAS_RESIDUAL": True, "BLOCK": 8192}, 16),
            (silu_mul._silu_and_mul_kernel, {"BLOCK": 1024}, 4),
            (rope._rope_kernel, {"HALF": 64, "BLOCK_QH": 32, "BLOCK_KH": 2}, 4),
            (store_kv._store_kv_kernel, {"HEAD_DIM": 128, "BLOCK_H": 2}, 4),
        ]
        for kernel, constexprs, num_warps in jobs:
            shared = compile_one(kernel, dtype, constexprs, num_warps)
            lines.append(f"{kernel.__name__} {TYPE_NAMES[dtype]} shared={shared}")
    for dtype, head_dim in ((torch.bfloat16, 128), (torch.float16, 64), (torch.float32, 128)):
        block_m, block_n, num_warps = prefill_attention._pick_blocks(head_dim, dtype)
        common = {"HEAD_DIM": head_dim, "DOT_PRECISION": prefill_attention.dot_precision(dtype), "DOT_IN_FP32": False}
        jobs = [
            (prefill_attention._prefill_attention_kernel, {**common, "BLOCK_M": block_m, "BLOCK_N": block_n},
             num_warps),
            (decode_attention._decode_split_kernel,
             {**common, "NUM_SPLITS": 8, "BLOCK_G": 16, "BLOCK_N": decode_attention._pick_block_n(head_dim, dtype)},
             4),
            (decode_attention._decode_combine_kernel, {"NUM_SPLITS": 8, "HEAD_DIM": head_dim, "BLOCK_S": 8}, 4),
        ]
        for kernel, constexprs, num_warps in jobs:
            shared = compile_one(kernel, dtype, constexprs, num_warps)
            lines.append(f"{kernel.__name__} {TYPE_NAMES[dtype]} d={head_dim} shared={shared}")
    return lines


def main() -> int:
    if interpret_mode():
        print("unset TRITON_INTERPRET: ahead-of-time compilation needs Triton in compiled mode", file=sys.stderr)
        return 2
    for line in compile_all():
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
