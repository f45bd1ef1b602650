"""Ahead-of-time compile every Triton kernel for sm_90 (H100/H200) with the ptxas bundled in the
Triton wheel, exactly as the JIT would compile it at serving shapes, and check its resources.

Needs no GPU. The wrappers are called the way the model calls them (q as a view of the fused qkv
buffer, decode on the batch's first rows, prefill on the rest) on CPU tensors under
`tests.kernels.jit_capture`: the JIT binds and specializes each launch (including the 16-byte
divisibility hints it adds for aligned pointers and integers) and hands it over uncompiled. Each
distinct specialization is then compiled for sm_90 and its cubin read with the wheel's cuobjdump:
registers, local memory (spills), stack and shared memory. A check fails on spills, on more than
255 registers, or on more shared memory than an A100 has.

Run where Triton is in compiled mode: `python -m tests.kernels.aot_compile [--json PATH]`.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kernels.triton.launch import interpret_mode
from tests.kernels.jit_capture import Specialization, capture_specializations

A100_SHARED_BYTES = 166_912  # the smallest datacenter-GPU limit the serving configs must fit
MAX_REGISTERS = 255
TYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass(slots=True)
class ServingShape:
    """Model dimensions whose kernel launches are compiled."""

    name: str
    hidden: int
    intermediate: int
    q_heads: int
    kv_heads: int
    head_dim: int


SHAPES = [ServingShape("llama3-8b", 4096, 14336, 32, 8, 128),
          ServingShape("smollm2-135m", 576, 1536, 9, 3, 64)]
# (shape, dtype) pairs compiled: the serving dtypes at both head sizes, fp16 and fp32 once each
CONFIGS = [("llama3-8b", torch.bfloat16), ("smollm2-135m", torch.bfloat16),
           ("llama3-8b", torch.float32), ("smollm2-135m", torch.float16)]


@dataclass(slots=True)
class KernelReport:
    """Resources of one compiled specialization."""

    kernel: str
    config: str
    registers: int
    local_bytes: int  # local memory per thread: register spills (and stack arrays)
    stack_bytes: int
    shared_bytes: int
    cp_async: bool  # the PTX stages loads through cp.async (software pipelining)
    divisible_args: list[str]

    def problems(self) -> list[str]:
        found = []
        if self.local_bytes or self.stack_bytes:
            found.append(f"spills ({self.local_bytes} B local, {self.stack_bytes} B stack)")
        if self.registers > MAX_REGISTERS:
            found.append(f"{self.registers} registers")
        if self.shared_bytes > A100_SHARED_BYTES:
            found.append(f"{self.shared_bytes} B shared memory")
        return found


def serving_launches(shape: ServingShape, dtype: torch.dtype) -> None:
    """One mixed step's kernel calls (3 decode rows, 2 prefill chunks), shaped as the model makes them."""
    from kernels.triton.decode_attention import decode_attention
    from kernels.triton.prefill_attention import prefill_attention
    from kernels.triton.rmsnorm import rms_norm
    from kernels.triton.rope import apply_rope
    from kernels.triton.silu_mul import silu_and_mul
    from kernels.triton.store_kv import store_kv

    d, qh, kvh = shape.head_dim, shape.q_heads, shape.kv_heads
    decode_rows, prefill_lens = 3, [5, 9]
    tokens = decode_rows + sum(prefill_lens)
    capacity, max_model_len = 64, 32
    hidden = torch.randn(tokens, shape.hidden, dtype=dtype)
    weight = torch.ones(shape.hidden, dtype=dtype)
    x, residual = rms_norm(hidden, weight, 1e-5)
    rms_norm(x, weight, 1e-5, residual)
    qkv = torch.randn(tokens, (qh + 2 * kvh) * d, dtype=dtype)  # the fused projection's output
    q = qkv[:, :qh * d].view(tokens, qh, d)
    k = qkv[:, qh * d:(qh + kvh) * d].view(tokens, kvh, d)
    v = qkv[:, (qh + kvh) * d:].view(tokens, kvh, d)
    positions = torch.arange(tokens, dtype=torch.int64)
    cos_sin = torch.randn(max_model_len, d, dtype=torch.float32)
    k_cache = torch.zeros(capacity + 1, kvh, d, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    apply_rope(q, k, positions, cos_sin)
    store_kv(k_cache, v_cache, k, v, torch.arange(tokens, dtype=torch.int64))
    table = torch.zeros(8, max_model_len, dtype=torch.int32)
    slots = torch.arange(decode_rows + len(prefill_lens), dtype=torch.int32)
    seq_lens = torch.tensor([4, 17, 30], dtype=torch.int32)
    decode_attention(q[:decode_rows], k_cache, v_cache, table, slots[:decode_rows], seq_lens,
                     d ** -0.5, max_model_len)
    cu = torch.tensor([0, prefill_lens[0], sum(prefill_lens)], dtype=torch.int32)
    prefill_attention(q[decode_rows:], k_cache, v_cache, table, slots[decode_rows:],
                      torch.tensor([0, 11], dtype=torch.int32), cu, max(prefill_lens), d ** -0.5)
    gate_up = torch.randn(tokens, 2 * shape.intermediate, dtype=dtype)
    silu_and_mul(gate_up)


def capture_all() -> list[tuple[str, Specialization]]:
    """(config name, specialization) for every distinct compile of every config."""
    by_name = {shape.name: shape for shape in SHAPES}
    found: dict[str, tuple[str, Specialization]] = {}
    for shape_name, dtype in CONFIGS:
        with capture_specializations() as recorded:
            serving_launches(by_name[shape_name], dtype)
        for spec in recorded:
            found.setdefault(spec.key, (f"{shape_name} {TYPE_NAMES[dtype]}", spec))
    return list(found.values())


def _cuobjdump() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def compile_spec(config: str, spec: Specialization) -> KernelReport:
    """Compile one captured specialization for sm_90 and read its resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(spec.kernel, spec.signature, spec.constants, spec.attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(spec.options))
    cubin = compiled.asm.get("cubin")
    if not cubin:
        raise RuntimeError(f"{spec.name} ({config}): no cubin produced")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        usage = subprocess.run([str(_cuobjdump()), "-res-usage", handle.name], capture_output=True,
                               text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    return KernelReport(kernel=spec.name, config=config, registers=int(fields["REG"]),
                        local_bytes=int(fields["LOCAL"]), stack_bytes=int(fields["STACK"]),
                        shared_bytes=max(int(fields["SHARED"]), compiled.metadata.shared),
                        cp_async="cp.async" in compiled.asm["ptx"],
                        divisible_args=spec.divisible_args())


def compile_all() -> list[KernelReport]:
    """Every distinct serving specialization, compiled and measured."""
    return [compile_spec(config, spec) for config, spec in capture_all()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the reports here as JSON")
    args = parser.parse_args(argv)
    if interpret_mode():
        print("unset TRITON_INTERPRET: ahead-of-time compilation needs Triton in compiled mode",
              file=sys.stderr)
        return 2
    reports = compile_all()
    failed = False
    for report in reports:
        problems = report.problems()
        failed |= bool(problems)
        print(f"{report.kernel} [{report.config}] regs={report.registers} "
              f"local={report.local_bytes} stack={report.stack_bytes} shared={report.shared_bytes} "
              f"cp_async={report.cp_async}" + (f"  FAIL: {'; '.join(problems)}" if problems else ""))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in reports], indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
