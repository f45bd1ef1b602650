"""Weight-only quantized GEMM, W8A16 and W4A16 (Triton). Twin of kernels.quant.quantized_linear.

out [M, N] = x [M, K] @ W^T (+ bias [N]) in x's dtype (fp16, bf16 or fp32), W [N, K] a
PackedQuantWeight (kernels/triton/quant_pack.py: group-major int8, or int4 two per byte, per-group
scales and offsets). One kernel serves both kinds (INT4 is a constexpr). A program owns an output
tile and walks K one quantization group (G input features) at a time: it loads the group's weight
bytes [BLOCK_N, G or G/2] and x^T [G, BLOCK_M], dequantizes the levels in registers (scale *
(q - zero) + offset in fp32, rounded to x's dtype as a bf16/fp16 GEMM would hold the weight) and
accumulates tl.dot(W, x^T) in fp32: the tile is out^T [BLOCK_N, BLOCK_M], so the dequantized
weight is the first operand (Hopper's wgmma takes it from registers) and the few decode rows are
the narrow second dimension (wgmma n = 16, not a 64-row tile of which 63 rows are padding).

Decode (M <= 64 rows) is bandwidth-bound: every weight byte is read once per step. Its few output
tiles cannot fill an H200's 132 SMs, so K is split: program z sums a contiguous run of groups into
an fp32 partial [splits, M, N], and `_split_sum_kernel` adds the partials in a fixed order
(deterministic, unlike atomics) with the bias. Prefill (M > 64) is compute-bound: 128 x 128
tiles, no split. `num_splits` and M are runtime arguments (never specialized): one compiled
variant per tile config serves every batch size in its range.

Checked without a GPU by compiling for sm_90 (tests/kernels/test_triton_quant_gemm.py): no
spills, weights staged through shared memory by cp.async. Measured speed: bench/kernels.py and
the gpu_check `quant_gemm` step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from kernels.model_view import LinearFn, ModelWeightsView
from kernels.quant import QuantizedWeight
# absolute: plain torch, so the tests' private interpreter copy of this package shares its class
from kernels.triton.quant_pack import PackedQuantWeight, pack

from . import _checks
from .launch import dot_in_fp32, dot_precision, interpret_mode, target_programs

DECODE_MAX_ROWS = 64  # up to this many rows: small tiles and split-K (bandwidth-bound)
MAX_SPLITS = 16  # the most K slices per output tile
PARTIAL_BYTES_CAP = 32 << 20  # fp32 partials of a split product stay under this
SUM_BLOCK = 1024  # output columns per program of the split sum


@triton.jit
def _dequantize(levels, scale, offset, ZERO: tl.constexpr, HAS_OFFSETS: tl.constexpr):
    """levels [BLOCK_N, G] -> fp32 weights scale * (levels - ZERO) (+ offset), per output row."""
    weights = (levels.to(tl.float32) - ZERO) * scale[:, None]
    if HAS_OFFSETS:
        weights = weights + offset[:, None]
    return weights


@triton.jit
def _load_group(q_ptrs, n_mask, BLOCK_N: tl.constexpr, GROUP: tl.constexpr, INT4: tl.constexpr):
    """One group's levels [BLOCK_N, GROUP]: q_ptrs [BLOCK_N, GROUP] int8 levels, or
    [BLOCK_N, GROUP / 2] bytes holding input features 2j (low nibble) and 2j + 1 (high)."""
    levels = tl.load(q_ptrs, mask=n_mask[:, None], other=0)
    if INT4:
        levels = tl.join(levels & 0xF, levels >> 4).reshape(BLOCK_N, GROUP)
    return levels


@triton.jit(do_not_specialize=["M", "groups_per_split", "num_splits"])
def _quant_gemm_kernel(
    x_ptr,  # *T [M, K]: activations, unit stride along K
    q_ptr,  # *i8 [K / GROUP, N, GROUP] | *u8 [K / GROUP, N, GROUP / 2]: levels (quant_pack.py)
    scales_ptr,  # *f16|f32 [K / GROUP, N]: per-group scales, contiguous
    offsets_ptr,  # *f16|f32 [K / GROUP, N]: per-group offsets (read only when HAS_OFFSETS)
    bias_ptr,  # *B [N]: bias (read only when HAS_BIAS)
    out_ptr,  # *T [M, N]: the product (written when num_splits == 1)
    partial_ptr,  # *f32 [num_splits, M, N]: per-slice sums (written when num_splits > 1)
    M,  # rows of x (runtime)
    N,  # output features
    K,  # input features, a multiple of GROUP
    x_row_stride,  # elements between rows of x
    out_row_stride,  # elements between rows of out
    groups_per_split,  # groups summed by one K slice (the last slice may have fewer)
    num_splits,  # K slices per output tile; 1 = no split (runtime)
    GROUP: tl.constexpr,  # input features per scale: the K step of the loop
    INT4: tl.constexpr,  # two levels per byte (else one int8 level per byte)
    ZERO: tl.constexpr,  # level subtracted before scaling (8: symmetric int4), else 0
    HAS_OFFSETS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no TF32), else "tf32" (the default)
    DOT_IN_FP32: tl.constexpr,  # interpreter only: its tl.dot cannot multiply bf16, so upcast
):
    # out^T tile [BLOCK_N, BLOCK_M] = W [BLOCK_N, K] @ x^T [K, BLOCK_M]: the dequantized weight
    # is the dot's first operand (tensor cores take it from registers), and the few decode rows
    # are its narrow second dimension
    BYTES: tl.constexpr = GROUP // 2 if INT4 else GROUP  # bytes of one output's group
    split = tl.program_id(2)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rows < M
    n_mask = cols < N
    first = split * groups_per_split
    last = tl.minimum(first + groups_per_split, K // GROUP)
    # [GROUP, BLOCK_M]: x^T over the input features of group `first`
    x_ptrs = (x_ptr + rows.to(tl.int64)[None, :] * x_row_stride
              + (first * GROUP + tl.arange(0, GROUP))[:, None])
    # [BLOCK_N, BYTES]: output n's bytes of group `first`; a group's tile is one contiguous run
    q_ptrs = (q_ptr + first.to(tl.int64) * N * BYTES + cols[:, None] * BYTES
              + tl.arange(0, BYTES)[None, :])
    s_ptrs = scales_ptr + first.to(tl.int64) * N + cols
    o_ptrs = offsets_ptr + first.to(tl.int64) * N + cols
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for _ in range(first, last):
        x = tl.load(x_ptrs, mask=m_mask[None, :], other=0.0)  # [GROUP, BLOCK_M]
        levels = _load_group(q_ptrs, n_mask, BLOCK_N, GROUP, INT4)  # [BLOCK_N, GROUP]
        scale = tl.load(s_ptrs, mask=n_mask, other=0.0).to(tl.float32)
        offset = scale
        if HAS_OFFSETS:
            offset = tl.load(o_ptrs, mask=n_mask, other=0.0).to(tl.float32)
        w = _dequantize(levels, scale, offset, ZERO, HAS_OFFSETS).to(x_ptr.dtype.element_ty)
        if DOT_IN_FP32:
            x, w = x.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(w, x, acc, input_precision=DOT_PRECISION)
        x_ptrs += GROUP
        q_ptrs += N * BYTES
        s_ptrs += N
        o_ptrs += N
    mask = n_mask[:, None] & m_mask[None, :]
    if num_splits == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        out_ptrs = out_ptr + rows.to(tl.int64)[None, :] * out_row_stride + cols[:, None]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        slice_rows = (split * M + rows).to(tl.int64)
        tl.store(partial_ptr + slice_rows[None, :] * N + cols[:, None], acc, mask=mask)


@triton.jit(do_not_specialize=["M", "num_splits"])
def _split_sum_kernel(
    partial_ptr,  # *f32 [num_splits, M, N]: per-slice sums of the product
    bias_ptr,  # *B [N]: bias (read only when HAS_BIAS)
    out_ptr,  # *T [M, N]: the product
    M,  # rows (runtime)
    N,  # output features
    out_row_stride,  # elements between rows of out
    num_splits,  # slices to add (runtime)
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,  # output columns per program
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    n_mask = cols < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for split in range(num_splits):  # in order: the same sum every run
        acc += tl.load(partial_ptr + (split * M + row) * N + cols, mask=n_mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * out_row_stride + cols, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


@dataclass(frozen=True, slots=True)
class Tiles:
    """One launch configuration of the quantized GEMM."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def pick_tiles(rows: int, dtype: torch.dtype) -> Tiles:
    """Tiles for `rows` rows of `dtype` activations: small ones in the interpreter; on GPU 16-row
    tiles for decode, 64 up to DECODE_MAX_ROWS, 128 x 128 for prefill (fp32: FMA-unit tiles)."""
    if interpret_mode():
        return Tiles(16 if rows <= 16 else 64, 32, 1, 1)
    if dtype == torch.float32:  # ieee fp32 dots run on FMA units: keep the tile in registers
        return Tiles(16 if rows <= 16 else 32, 64, 4, 3)
    if rows <= 16:
        return Tiles(16, 128, 4, 4)
    if rows <= DECODE_MAX_ROWS:
        return Tiles(64, 128, 4, 3)
    return Tiles(128, 128, 8, 3)


def pick_splits(tiles: int, groups: int, rows: int, out_features: int,
                device: torch.device) -> int:
    """K slices per output tile: enough to (nearly) fill the device at decode, 1 for prefill,
    never more than the groups, MAX_SPLITS, or partials over PARTIAL_BYTES_CAP."""
    busy = target_programs(device)
    if rows > DECODE_MAX_ROWS or tiles * 2 > busy:
        return 1
    by_memory = PARTIAL_BYTES_CAP // max(rows * out_features * 4, 1)
    return max(1, min(triton.cdiv(busy, tiles), groups, MAX_SPLITS, by_memory))


def _check(x: Tensor, weight: PackedQuantWeight, bias: Tensor | None) -> None:
    if not isinstance(weight, PackedQuantWeight):
        raise TypeError(f"weight must be a PackedQuantWeight (kernels.triton.quant_pack.pack), "
                        f"got {type(weight).__name__}")
    _checks.check_rank("x", x, 2)
    _checks.check_float("x", x)
    _checks.check_unit_last_stride("x", x)
    out_features, in_features = weight.shape
    if x.shape[1] != in_features:
        raise ValueError(f"x must have {in_features} columns (the weight's in_features), "
                         f"got {x.shape[1]}")
    for name, tensor in (("qweight", weight.qweight), ("scales", weight.scales),
                         ("offsets", weight.offsets)):
        if tensor is not None:
            _checks.check_contiguous(name, tensor)
    tensors = {"x": x, "qweight": weight.qweight, "scales": weight.scales}
    if bias is not None:
        _checks.check_rank("bias", bias, 1)
        _checks.check_float("bias", bias)
        _checks.check_contiguous("bias", bias)
        _checks.check_length("bias", bias, out_features)
        tensors["bias"] = bias
    _checks.check_same_device(**tensors)


def quantized_linear(x: Tensor, weight: PackedQuantWeight, bias: Tensor | None = None,
                     num_splits: int | None = None) -> Tensor:
    """x [M, K] @ W^T (+ bias [N]) -> [M, N] in x's dtype, W [N, K] packed by quant_pack.pack.

    num_splits: K slices per output tile (None: chosen to fill the device; tests force it)."""
    _check(x, weight, bias)
    rows = x.shape[0]
    out_features, in_features = weight.shape
    out = torch.empty((rows, out_features), dtype=x.dtype, device=x.device)
    if rows == 0 or out_features == 0:
        return out
    tiles = pick_tiles(rows, x.dtype)
    grid_n, grid_m = triton.cdiv(out_features, tiles.block_n), triton.cdiv(rows, tiles.block_m)
    groups = in_features // weight.group_size
    splits = num_splits or pick_splits(grid_n * grid_m, groups, rows, out_features, x.device)
    groups_per_split = triton.cdiv(groups, max(1, min(splits, groups)))
    splits = triton.cdiv(groups, groups_per_split)  # no empty slice
    partial = torch.empty((splits, rows, out_features) if splits > 1 else (1,),
                          dtype=torch.float32, device=x.device)
    has_offsets = weight.offsets is not None
    _quant_gemm_kernel[(grid_n, grid_m, splits)](
        x, weight.qweight, weight.scales, weight.offsets if has_offsets else weight.scales,
        bias if bias is not None else out, out, partial,
        rows, out_features, in_features,
        x.stride(0), out.stride(0),
        groups_per_split, splits,
        GROUP=weight.group_size,
        INT4=weight.kind == "int4",
        ZERO=weight.zero,
        HAS_OFFSETS=has_offsets,
        HAS_BIAS=bias is not None,
        BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n,
        DOT_PRECISION=dot_precision(x.dtype),
        DOT_IN_FP32=dot_in_fp32(x.dtype),
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )
    if splits > 1:
        block = min(SUM_BLOCK, triton.next_power_of_2(out_features))
        _split_sum_kernel[(rows, triton.cdiv(out_features, block))](
            partial, bias if bias is not None else out, out, rows, out_features, out.stride(0),
            splits, HAS_BIAS=bias is not None, BLOCK=block, num_warps=1 if interpret_mode() else 4)
    return out


def linear(x: Tensor, weight, bias: Tensor | None = None) -> Tensor:
    """Triton: the quantized GEMM for a packed weight, F.linear (cuBLAS) for a plain one. A
    QuantizedWeight is packed on the way (correct, but every call: prepare_weights packs once)."""
    if isinstance(weight, PackedQuantWeight):
        return quantized_linear(x, weight, bias)
    if isinstance(weight, QuantizedWeight):
        return quantized_linear(x, pack(weight), bias)
    return F.linear(x, weight, bias)


def model_linear(weights: ModelWeightsView) -> LinearFn:
    """Triton: F.linear when every projection of `weights` is plain, else `linear`."""
    projections = [weights.lm_head] + [w for layer in weights.layers for w in (
        layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj)]
    quantized = any(isinstance(w, (PackedQuantWeight, QuantizedWeight)) for w in projections)
    return linear if quantized else F.linear
