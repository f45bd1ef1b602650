"""Weight-only int8 / int4 projections on CPU: kernels.quant.QuantizedWeight packed once at load
for the C kernels in kernels/cpu/csrc/gemm_quant.c, and the product over them.

Three routes compute x @ W^T for a packed weight (`PackedQuant`):
- "vnni": activations quantized per row and group to int8, integer dot products with
  AVX512-VNNI, fp32 across groups (csrc/gemm_quant.c's header has the arithmetic).
- "panel": each panel of 16-column blocks dequantized to bf16 in cache, then the bf16 C
  kernel's tiles (AVX512-BF16).
- "dense": the whole weight dequantized per call to plain [out, in], then F.linear (oneDNN,
  which takes AMX where the CPU has it; MKL for fp32): the fallback that runs anywhere.
Which one runs is decided per shape and row bucket by measurement (kernels/cpu/gemm_choice.py,
"quant" = vnni against "dequant" = panel, or dense where the CPU has AMX); without VNNI (or
LLMSERVE_CPU_VNNI=0) every bucket dequantizes. LLMSERVE_CPU_GEMM=native keeps vnni, =dequant
the panel route, =onednn the dense one.

Scales and offsets are packed as fp16 times a per-weight power of two (2^shift, chosen so the
largest is near 2^14: fp16's normal range holds 2^28 below that): GGUF's fp16 scales stay exact,
kernels.quant's own fp32 scales round by at most 2^-11 relative (1/16 of an int8 step).
Symmetric int4 (offsets exactly -8 * scales: GGUF Q4_0, quantize_int4(symmetric=True)) packs no
offsets.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.cpu import gemm_choice, native_quant
from kernels.quant import QuantizedWeight, check, unpack_int4

ROUTES = ("vnni", "panel", "dense")
FP16_TOP_EXPONENT = 14   # the largest scale or offset is packed below 2^14


@dataclass(slots=True, eq=False)
class PackedQuant:
    """A QuantizedWeight packed for csrc/gemm_quant.c; `.shape` is (out, in) and `.nbytes` the
    bytes it holds, as for a tensor."""

    kind: str                   # "int8" | "int4"
    group_size: int             # input features per scale
    data: Tensor                # uint8 [out / 16, in / 4 (int8 + 128) | in / 8 (int4), 64]
    scales: Tensor              # fp16 bits as int16 [out / 16, in / group, 16], times 2^shift
    offsets: Tensor | None      # as scales (int4), None (int8; symmetric int4: -8 * scales)
    unscale: float              # 2^-shift
    routes: tuple[str, ...]     # per gemm_choice bucket: "vnni" | "panel" | "dense"
    struct: native_quant.QuantWeight = field(init=False)

    def __post_init__(self) -> None:
        out_features, in_features = self.shape
        self.struct = native_quant.QuantWeight(
            native_quant.QUANT_KINDS[self.kind], self.group_size, out_features, in_features,
            self.data.data_ptr(), self.scales.data_ptr(),
            self.offsets.data_ptr() if self.offsets is not None else None, self.unscale)

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features) of the weight this stands for."""
        return self.scales.shape[0] * 16, self.scales.shape[1] * self.group_size

    @property
    def nbytes(self) -> int:
        """Bytes held: packed levels, scales and offsets."""
        held = [self.data, self.scales] + ([self.offsets] if self.offsets is not None else [])
        return sum(t.numel() * t.element_size() for t in held)

    @property
    def device(self) -> torch.device:
        """Where the packed tensors are (the CPU)."""
        return self.data.device


def vnni_available() -> bool:
    """Whether the VNNI kernel is built here and not turned off (LLMSERVE_CPU_VNNI=0)."""
    return os.environ.get("LLMSERVE_CPU_VNNI", "1") != "0" and native_quant.vnni_built()


def dequant_route() -> str:
    """The route the 'dequant' candidate takes: the bf16 C kernel's tiles over dequantized
    panels where it is built and the CPU has no AMX (else oneDNN's AMX wins), else dense."""
    panel = native_quant.dequant_built() and not gemm_choice.cpu_has_amx()
    return "panel" if panel and os.environ.get("LLMSERVE_CPU_GEMM") != "onednn" else "dense"


def default_routes(mode: str) -> tuple[str, ...]:
    """Every bucket's route without a measurement, for LLMSERVE_CPU_GEMM=mode."""
    if mode == "onednn":
        route = "dense"
    elif mode == "dequant" or not vnni_available():
        route = "panel" if native_quant.dequant_built() else "dense"
    else:
        route = "vnni"
    return (route,) * len(gemm_choice.BUCKET_ROWS)


def can_pack(weight: QuantizedWeight) -> bool:
    """True for a CPU QuantizedWeight with out % 16 == 0 when the C library is here."""
    return (isinstance(weight, QuantizedWeight) and weight.qweight.device.type == "cpu"
            and weight.shape[0] % 16 == 0 and native_quant.load() is not None)


def _fp16_shift(weight: QuantizedWeight) -> int:
    """The power of two that puts the largest |scale| or |offset| just below 2^14."""
    top = weight.scales.abs().max().item()
    if not symmetric(weight):
        top = max(top, weight.offsets.abs().max().item())
    if not top > 0 or not math.isfinite(top):
        return 0
    return max(-60, min(60, FP16_TOP_EXPONENT - math.frexp(top)[1]))


def _per_block(values: Tensor, shift: int) -> Tensor:
    """float32 [out, groups] -> fp16 [out / 16, groups, 16] times 2^shift (bits as int16)."""
    out_features, groups = values.shape
    scaled = torch.ldexp(values, torch.tensor(float(shift))).to(torch.float16)
    return scaled.reshape(out_features // 16, 16, groups).transpose(1, 2).contiguous() \
        .view(torch.int16)


def symmetric(weight: QuantizedWeight) -> bool:
    """int8, or int4 whose offsets are exactly -8 * scales (GGUF Q4_0,
    quantize_int4(symmetric=True)): packed without offsets, the kernels correct with an integer
    instead."""
    return weight.offsets is None or torch.equal(weight.offsets, -8 * weight.scales)


def pack(weight: QuantizedWeight, routes: tuple[str, ...] | None = None) -> PackedQuant:
    """A QuantizedWeight [out, in] -> the packed layout of csrc/gemm_quant.c (see its header)."""
    check(weight)
    if not can_pack(weight):
        raise ValueError(f"cannot pack a {weight.kind} weight of shape {weight.shape} on "
                         f"{weight.qweight.device} for the C kernels: needs CPU, out % 16 == 0 "
                         "and the C library")
    out_features, in_features = weight.shape
    blocks = out_features // 16
    if weight.kind == "int8":   # + 128 (offset binary); [blocks, 16, quads, 4] -> quads first
        levels = (weight.qweight.view(torch.uint8) ^ 0x80).reshape(blocks, 16, in_features // 4, 4)
        data = levels.permute(0, 2, 1, 3).reshape(blocks, in_features // 4, 64)
    else:                       # [blocks, 16, octets, 2 halves, 4]: low nibble, high nibble
        levels = unpack_int4(weight.qweight).reshape(blocks, 16, in_features // 8, 2, 4)
        nibbles = levels[:, :, :, 0, :] | (levels[:, :, :, 1, :] << 4)
        data = nibbles.permute(0, 2, 1, 3).reshape(blocks, in_features // 8, 64)
    shift = _fp16_shift(weight)
    offsets = None if symmetric(weight) else _per_block(weight.offsets, shift)
    return PackedQuant(weight.kind, weight.group_size, data.contiguous(),
                       _per_block(weight.scales, shift), offsets, math.ldexp(1.0, -shift),
                       routes or default_routes(os.environ.get("LLMSERVE_CPU_GEMM", "auto")))


def dequantize(weight: PackedQuant, dtype: torch.dtype = torch.float32) -> Tensor:
    """The plain [out, in] weight a packed one stands for (with its fp16 scales), in dtype."""
    return native_quant.dequantize_weight(weight.struct, dtype)


def vnni_linear(x: Tensor, weight: PackedQuant, bias: Tensor | None = None) -> Tensor:
    """x [rows, in] (bf16 or fp32) @ W^T (+ bias) through the VNNI kernel."""
    return native_quant.gemm_quant(x, weight.struct, bias)


def panel_linear(x: Tensor, weight: PackedQuant, bias: Tensor | None = None) -> Tensor:
    """bf16 x [rows, in] @ W^T (+ bias) through dequantized panels and the bf16 C tiles."""
    return native_quant.gemm_dequant_bf16(x, weight.struct, bias)


def dense_linear(x: Tensor, weight: PackedQuant, bias: Tensor | None = None) -> Tensor:
    """x @ W^T (+ bias) through the whole weight dequantized to x's dtype and F.linear."""
    return F.linear(x, dequantize(weight, x.dtype), bias)


_ROUTE_FNS = {"vnni": vnni_linear, "panel": panel_linear, "dense": dense_linear}


def route_for(weight: PackedQuant, rows: int, dtype: torch.dtype) -> str:
    """The route a product over `rows` rows of `dtype` takes (panel needs bf16 x)."""
    route = weight.routes[gemm_choice.bucket_index(rows)]
    if route == "panel" and dtype != torch.bfloat16:
        return "vnni" if vnni_available() else "dense"
    return route


def choosable(weights: list[PackedQuant]) -> bool:
    """Whether the chooser has two routes to weigh for one shape's weights: the VNNI kernel is
    here and every layer holds the same kind and group."""
    return vnni_available() and len({(w.kind, w.group_size) for w in weights}) == 1


def candidates(name: str, weights: list[PackedQuant]) -> list[gemm_choice.ShapeCandidates]:
    """What gemm_choice times for one quantized shape: VNNI against the dequantized route."""
    out_features, in_features = weights[0].shape
    challenger = _ROUTE_FNS[dequant_route()]
    return [gemm_choice.ShapeCandidates(
        name, out_features, in_features, len(weights),
        run_native=lambda x, i: vnni_linear(x, weights[i]),
        run_onednn=lambda x, i: challenger(x, weights[i]),
        make_x=lambda rows: torch.randn(rows, in_features, dtype=torch.bfloat16),
        max_rows=gemm_choice.LM_HEAD_MAX_ROWS if name == "lm_head" else
        gemm_choice.BUCKET_ROWS[-1],
        labels=gemm_choice.QUANT_LABELS,
        weight_bytes=weights[0].nbytes / (out_features * in_features))]


def take_choices(weights: list[PackedQuant], choices: list[str]) -> None:
    """Set every weight's routes from the chooser's picks per bucket (the challenger: the
    dequantized route; the incumbent: VNNI)."""
    dequant = dequant_route()
    challengers = (gemm_choice.DEQUANT, gemm_choice.ONEDNN)
    routes = tuple(dequant if choice in challengers else "vnni" for choice in choices)
    for weight in weights:
        weight.routes = routes


def quant_linear(x: Tensor, weight: PackedQuant, bias: Tensor | None = None) -> Tensor:
    """x [rows, in] @ W^T (+ bias [out]) -> [rows, out] in x's dtype (bf16 or fp32), by the
    route the weight's measured choice gives for x's row count."""
    in_features = weight.shape[1]
    if x.dim() != 2 or x.shape[1] != in_features or x.dtype not in (torch.bfloat16,
                                                                    torch.float32):
        raise ValueError(f"quant_linear: x must be bf16 or fp32 [rows, {in_features}], got "
                         f"{x.dtype} {tuple(x.shape)}")
    x = x if x.stride(1) == 1 else x.contiguous()
    if bias is not None:
        if bias.numel() != weight.shape[0]:
            raise ValueError(f"quant_linear: bias must have {weight.shape[0]} values, got "
                             f"{tuple(bias.shape)}")
        bias = bias.to(x.dtype).contiguous()
    return _ROUTE_FNS[route_for(weight, x.shape[0], x.dtype)](x, weight, bias)
