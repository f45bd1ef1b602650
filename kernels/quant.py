"""Weight-only quantized projections: the one format every loader produces and every backend packs.

A `QuantizedWeight` stands for an [out, in] weight split along `in` into groups of `group_size`:

    w[o, i] = scales[o, g] * q[o, i] + offsets[o, g]     (g = i // group_size)

- kind "int8": q in [-127, 127] as int8 [out, in]; offsets is None (symmetric). GGUF Q8_0 is
  this kind with group 32 (its fp16 scales widened to float32, exactly).
- kind "int4": q in [0, 15] as uint8 [out, in // 2], element 2j in the low nibble of byte j and
  element 2j + 1 in the high nibble; offsets float32 [out, in // group_size]. `quantize_int4`
  makes offsets = the group's minimum by default (as GGUF Q4_1, d * q + m, has offsets = m);
  its symmetric form, like GGUF Q4_0 (d * (q - 8)), has offsets = -8 * scales.

Loaders (engine_svc/weights.py for `--quantization int8|int4`, the GGUF reader for the GGUF's
own tensors) build these on the CPU; a backend's `prepare_weights` packs them into its own layout
(kernels/cpu for the C kernels, kernels/triton for the W8A16/W4A16 GEMMs). The functions here are
the torch oracle the kernels are tested against. No backend imports here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

QUANT_KINDS = ("int8", "int4")
GROUP_SIZES = (32, 64)
INT8_MAX = 127
INT4_LEVELS = 15
INT4_ZERO = 8   # symmetric int4: q - 8 in [-8, 7]


@dataclass(slots=True)
class QuantizedWeight:
    """A weight-only quantized [out, in] projection (see the module docstring for the layout)."""

    kind: str                  # "int8" or "int4"
    qweight: Tensor            # int8 [out, in] | uint8 [out, in // 2] (two int4 per byte)
    scales: Tensor             # float32 [out, in // group_size]
    offsets: Tensor | None     # float32 [out, in // group_size] for int4, None for int8
    group_size: int            # input features per scale (32 or 64; GGUF blocks are 32)

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features) of the weight this stands for."""
        return self.scales.shape[0], self.scales.shape[1] * self.group_size

    @property
    def nbytes(self) -> int:
        """Bytes held by the quantized values, scales and offsets."""
        tensors = [self.qweight, self.scales] + ([self.offsets] if self.offsets is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device: torch.device | str) -> QuantizedWeight:
        """The same weight with every tensor on `device`."""
        offsets = self.offsets.to(device) if self.offsets is not None else None
        return QuantizedWeight(self.kind, self.qweight.to(device), self.scales.to(device), offsets,
                               self.group_size)


def check(weight: QuantizedWeight) -> None:
    """Raise ValueError naming the field when `weight` does not follow the layout above."""
    out_features, in_features = weight.shape
    groups = in_features // weight.group_size
    if weight.kind not in QUANT_KINDS:
        raise ValueError(f"QuantizedWeight.kind must be one of {QUANT_KINDS}, got {weight.kind!r}")
    if weight.scales.dtype != torch.float32 or weight.scales.dim() != 2:
        raise ValueError(f"QuantizedWeight.scales must be float32 [out, groups], got "
                         f"{weight.scales.dtype} {tuple(weight.scales.shape)}")
    if weight.kind == "int8":
        want = (torch.int8, (out_features, in_features))
        if weight.offsets is not None:
            raise ValueError("QuantizedWeight.offsets must be None for int8 (symmetric)")
    else:
        want = (torch.uint8, (out_features, in_features // 2))
        if (weight.offsets is None or weight.offsets.dtype != torch.float32
                or tuple(weight.offsets.shape) != (out_features, groups)):
            raise ValueError(f"QuantizedWeight.offsets must be float32 [{out_features}, {groups}] "
                             "for int4")
    if (weight.qweight.dtype, tuple(weight.qweight.shape)) != want:
        raise ValueError(f"QuantizedWeight.qweight must be {want[0]} {want[1]} for {weight.kind}, "
                         f"got {weight.qweight.dtype} {tuple(weight.qweight.shape)}")


def _groups(weight: Tensor, group_size: int) -> Tensor:
    """[out, in] -> float32 [out, in // group_size, group_size]; ValueError if `in` does not split."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")
    out_features, in_features = weight.shape
    if in_features % group_size:
        raise ValueError(f"in_features={in_features} is not a multiple of group_size={group_size}")
    return weight.float().reshape(out_features, in_features // group_size, group_size)


def quantize_int8(weight: Tensor, group_size: int = 32) -> QuantizedWeight:
    """Symmetric int8 per group: scale = max|w| / 127, q = round(w / scale)."""
    groups = _groups(weight, group_size)
    scales = groups.abs().amax(dim=2) / INT8_MAX                     # [out, groups]
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(groups / safe.unsqueeze(2)).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return QuantizedWeight("int8", q.reshape(weight.shape).contiguous(), scales.contiguous(), None,
                           group_size)


def quantize_int4(weight: Tensor, group_size: int = 32, symmetric: bool = False) -> QuantizedWeight:
    """int4 per group. Default (asymmetric, GGUF Q4_1's form): scale = (max - min) / 15,
    offset = min, q = round((w - min) / scale), so both ends of every group are exact.
    symmetric=True (GGUF Q4_0's form): scale = max|w| / 7, q = clamp(round(w / scale), -8, 7) + 8,
    offset = -8 * scale. Measured on SmolLM2-135M (bench/perplexity.py, group 32): symmetric
    raised perplexity 1.32x over bf16, asymmetric 1.001x; the kernels take both at one cost."""
    groups = _groups(weight, group_size)
    if symmetric:
        scales = groups.abs().amax(dim=2) / (INT4_ZERO - 1)           # [out, groups]
        offsets = -INT4_ZERO * scales
    else:
        offsets = groups.amin(dim=2)                                  # [out, groups]
        scales = (groups.amax(dim=2) - offsets) / INT4_LEVELS
    safe = torch.where(scales > 0, scales, torch.ones_like(scales)).unsqueeze(2)
    q = torch.round((groups - offsets.unsqueeze(2)) / safe).clamp_(0, INT4_LEVELS)
    return QuantizedWeight("int4", pack_int4(q.to(torch.uint8).reshape(weight.shape)),
                           scales.contiguous(), offsets.contiguous(), group_size)


def quantize(weight: Tensor, kind: str, group_size: int = 32) -> QuantizedWeight:
    """`weight` [out, in] quantized as `kind` ("int8" or "int4")."""
    if kind == "int8":
        return quantize_int8(weight, group_size)
    if kind == "int4":
        return quantize_int4(weight, group_size)
    raise ValueError(f"quantization kind must be one of {QUANT_KINDS}, got {kind!r}")


def pack_int4(levels: Tensor) -> Tensor:
    """uint8 [out, in] levels in [0, 15] -> uint8 [out, in // 2], even elements in low nibbles."""
    if levels.shape[-1] % 2:
        raise ValueError(f"int4 needs an even in_features, got {levels.shape[-1]}")
    return (levels[:, 0::2] | (levels[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: Tensor) -> Tensor:
    """uint8 [out, in // 2] -> uint8 [out, in] levels in [0, 15] (the inverse of pack_int4)."""
    levels = torch.stack([packed & 0xF, packed >> 4], dim=2)        # [out, in // 2, 2]
    return levels.reshape(packed.shape[0], packed.shape[1] * 2)


def dequantize(weight: QuantizedWeight, dtype: torch.dtype = torch.float32) -> Tensor:
    """The [out, in] weight `weight` stands for, in `dtype` (computed in float32)."""
    out_features, in_features = weight.shape
    groups = in_features // weight.group_size
    if weight.kind == "int8":
        q = weight.qweight.float()
    else:
        q = unpack_int4(weight.qweight).float()
    q = q.reshape(out_features, groups, weight.group_size)
    w = q * weight.scales.unsqueeze(2)
    if weight.offsets is not None:
        w = w + weight.offsets.unsqueeze(2)
    return w.reshape(out_features, in_features).to(dtype)


def has_quantized(weights) -> bool:
    """True when any projection of a ModelWeights-like object (layers, lm_head) is quantized."""
    projections = [weights.lm_head] + [w for layer in weights.layers for w in (
        layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj)]
    return any(isinstance(w, QuantizedWeight) for w in projections)


def quantized_linear(x: Tensor, weight: QuantizedWeight, bias: Tensor | None = None) -> Tensor:
    """x [rows, in] @ dequantize(weight)^T (+ bias [out]) -> [rows, out] in x's dtype: the
    weight-only (W8A16 / W4A16) oracle, products in float32."""
    y = x.float() @ dequantize(weight).to(x.device).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
