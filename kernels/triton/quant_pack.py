"""QuantizedWeight (kernels/quant.py) repacked once for the Triton W8A16 / W4A16 GEMM
(kernels/triton/quant_gemm.py). Plain torch: importing this imports no Triton.

The GEMM walks K one quantization group (G = group_size input features) at a time. The levels
are stored group-major, so that one group's tile [BLOCK_N outputs x its G or G/2 bytes] is one
contiguous run in memory (coalesced global loads, copied whole into shared memory) whose rows run
along K (each thread's consecutive-K tensor-core operand is one wide shared-memory read):

- int8: qweight int8 [in // G, out, G]: [g, o, j] = QuantizedWeight.qweight[o, g*G + j].
- int4: qweight uint8 [in // G, out, G // 2]: [g, o, j] = QuantizedWeight.qweight[o, g*G/2 + j],
  the same bytes (element 2j in the low nibble, 2j + 1 in the high), regrouped.
- scales (and offsets) [in // G, out], float16 where that holds every value exactly (GGUF's own
  fp16 scales do), else float32: fewer bytes read per group at decode, never a changed value.
- Symmetric int4 (offsets == -8 * scales exactly: `quantize_int4`, GGUF Q4_0) drops its offsets
  and keeps `zero` = 8: w = scale * (q - zero). Otherwise w = scale * q + offset (GGUF Q4_1), and
  int8 has neither (zero 0, no offsets).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TypeVar

import torch
from torch import Tensor

from kernels.model_view import ModelWeightsView
from kernels.quant import INT4_ZERO, QuantizedWeight, check, has_quantized

WeightsT = TypeVar("WeightsT", bound=ModelWeightsView)


@dataclass(slots=True)
class PackedQuantWeight:
    """A QuantizedWeight in the group-major layout of the Triton quantized GEMM (module docstring)."""

    kind: str                  # "int8" or "int4"
    qweight: Tensor            # int8 [groups, out, G] | uint8 [groups, out, G // 2] (2 per byte)
    scales: Tensor             # float16 | float32 [groups = in // G, out]
    offsets: Tensor | None     # like scales, or None (int8, symmetric int4)
    zero: int                  # level subtracted before scaling: 8 for symmetric int4, else 0
    group_size: int            # input features per scale (32 or 64)

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features) of the weight this stands for."""
        return self.scales.shape[1], self.scales.shape[0] * self.group_size

    @property
    def nbytes(self) -> int:
        """Bytes held by the quantized values, scales and offsets."""
        tensors = [self.qweight, self.scales] + ([self.offsets] if self.offsets is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device: torch.device | str) -> PackedQuantWeight:
        """The same weight with every tensor on `device`."""
        offsets = self.offsets.to(device) if self.offsets is not None else None
        return replace(self, qweight=self.qweight.to(device), scales=self.scales.to(device),
                       offsets=offsets)


def _group_major(values: Tensor, per_group: int) -> Tensor:
    """[out, groups * per_group] -> [groups, out, per_group] (a group's values of every output
    together)."""
    out_features, width = values.shape
    return values.reshape(out_features, width // per_group, per_group).transpose(0, 1)


def _narrow_floats(*tensors: Tensor | None) -> list[Tensor | None]:
    """The tensors as float16 when every value of every one survives the round trip, else as
    they are (float32)."""
    present = [t for t in tensors if t is not None]
    exact = all(torch.equal(t.half().float(), t) for t in present)
    return [t.half() if exact and t is not None else t for t in tensors]


def pack(weight: QuantizedWeight) -> PackedQuantWeight:
    """`weight` repacked group-major for the Triton GEMM, on its own device (values unchanged)."""
    check(weight)
    offsets, zero = weight.offsets, 0
    bytes_per_group = weight.group_size if weight.kind == "int8" else weight.group_size // 2
    qweight = _group_major(weight.qweight, bytes_per_group).contiguous()
    if weight.kind == "int4":
        if offsets is not None and torch.equal(offsets, -INT4_ZERO * weight.scales):
            offsets, zero = None, INT4_ZERO
    scales, offsets = _narrow_floats(weight.scales, offsets)
    return PackedQuantWeight(weight.kind, qweight, scales.t().contiguous(),
                             offsets.t().contiguous() if offsets is not None else None, zero,
                             weight.group_size)


def _packed(weight):
    """A QuantizedWeight packed; any other weight (a plain tensor) as it is."""
    return pack(weight) if isinstance(weight, QuantizedWeight) else weight


def prepare_weights(weights: WeightsT) -> WeightsT:
    """Triton: every quantized projection (and a quantized LM head) packed once for the GEMM;
    plain [out, in] tensors stay as they are (F.linear, cuBLAS)."""
    if not has_quantized(weights):
        return weights
    layers = [replace(layer, qkv_proj=_packed(layer.qkv_proj), o_proj=_packed(layer.o_proj),
                      gate_up_proj=_packed(layer.gate_up_proj),
                      down_proj=_packed(layer.down_proj))
              for layer in weights.layers]
    return replace(weights, layers=layers, lm_head=_packed(weights.lm_head))
