"""The Triton W8A16 / W4A16 GEMM (kernels/triton/quant_gemm.py) at a model's projection shapes,
ready to time against bf16 F.linear (cuBLAS) on the same weight: shared by bench/kernels.py and
the gpu_check `quant_gemm` step (bench/gpu_check_quant.py).

At decode (a few rows) both products are bound by the weight bytes they read: int4 reads
~0.28x, int8 ~0.53x the bytes of bf16 (scales included), so their GB/s against the device's copy
rate says how close the kernel is to the bound, and the speedup over bf16 what it buys. At
prefill (2048 rows) both are bound by tensor-core math: the ratio to cuBLAS is what is left to win.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

KINDS = {"int8": "w8a16", "int4": "w4a16"}
ROW_COUNTS = (1, 16, 256, 2048)


@dataclass(frozen=True, slots=True)
class Projection:
    """One projection of a decoder layer: [out_features, in_features]."""

    name: str
    out_features: int
    in_features: int


def projections(hidden: int, intermediate: int, q_heads: int, kv_heads: int,
                head_dim: int) -> list[Projection]:
    """The fused qkv, o, fused gate_up and down projections of a Llama-family layer."""
    return [Projection("qkv", (q_heads + 2 * kv_heads) * head_dim, hidden),
            Projection("o", hidden, q_heads * head_dim),
            Projection("gate_up", 2 * intermediate, hidden),
            Projection("down", hidden, intermediate)]


@dataclass(slots=True)
class QuantCase:
    """One quantized projection at one row count: both products, their costs, the error."""

    label: str                      # e.g. "w4a16 gate_up"
    rows: int
    ours: Callable[[], Tensor]      # the Triton GEMM on the packed weight
    bf16: Callable[[], Tensor]      # F.linear on the same weight, dequantized to x's dtype
    ours_bytes: int                 # packed weight + x + out
    bf16_bytes: int                 # dense weight + x + out
    flops: float
    max_abs_diff: float             # ours vs kernels.quant.quantized_linear
    rel_error: float                # ||ours - oracle|| / ||oracle||


@dataclass(slots=True)
class _Weights:
    quantized: object   # kernels.quant.QuantizedWeight
    packed: object      # kernels.triton.quant_pack.PackedQuantWeight
    dense: Tensor       # [out, in] in the activation dtype


def _weights(projection: Projection, kind: str, group: int, dtype: torch.dtype,
             device: torch.device) -> _Weights:
    from kernels import quant
    from kernels.triton.quant_pack import pack

    dense = torch.randn(projection.out_features, projection.in_features, device=device) * 0.02
    quantized = quant.quantize(dense, kind, group)
    del dense
    return _Weights(quantized, pack(quantized), quant.dequantize(quantized, dtype))


def _case(projection: Projection, kind: str, weights: _Weights, rows: int,
          dtype: torch.dtype) -> QuantCase:
    from kernels import quant
    from kernels.triton.quant_gemm import quantized_linear

    x = torch.randn(rows, projection.in_features, dtype=dtype, device=weights.dense.device)
    ours = lambda: quantized_linear(x, weights.packed)  # noqa: E731
    bf16 = lambda: F.linear(x, weights.dense)  # noqa: E731
    expected = quant.quantized_linear(x, weights.quantized).float()
    diff = ours().float() - expected
    elem = x.element_size()
    activations = rows * (projection.in_features + projection.out_features) * elem
    return QuantCase(f"{KINDS[kind]} {projection.name}", rows, ours, bf16,
                     weights.packed.nbytes + activations, weights.dense.numel() * elem + activations,
                     2.0 * rows * projection.out_features * projection.in_features,
                     float(diff.abs().max()),
                     float(diff.norm() / expected.norm().clamp_min(1e-30)))


def cases(shapes: list[Projection], row_counts: tuple[int, ...], dtype: torch.dtype,
          device: torch.device, kinds: tuple[str, ...] = tuple(KINDS),
          group: int = 32) -> Iterator[QuantCase]:
    """Every (projection, kind, row count) whose in_features splits into groups; each weight
    is built once for its row counts and dropped before the next."""
    for projection in shapes:
        if projection.in_features % group:
            continue
        for kind in kinds:
            weights = _weights(projection, kind, group, dtype, device)
            for rows in row_counts:
                yield _case(projection, kind, weights, rows, dtype)
            del weights
