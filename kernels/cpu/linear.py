"""bf16 matrix products on CPU, each weight packed once at load: for the C kernel in
kernels/cpu/csrc/gemm_bf16.c where the CPU has AVX512-BF16, else reordered for oneDNN.

`F.linear` on a plain bf16 weight makes oneDNN reorder that weight into its blocked layout on
every call. Reordering once (`torch.ops.mkldnn._reorder_linear_weight`, what inductor's weight
freezing does) gives the same numbers, bit for bit, and measured here (2-core AMD EPYC,
AVX512-BF16, 30 distinct 3072x576 weights): 2.1x faster at 1 row, 1.8x at 32 rows, 1.05x at
2048 rows. fp32 weights gain nothing from it (MKL's sgemm reads them as they are), so they stay.

The C kernel (`pack_native` + `native_linear`) is faster again than the reordered oneDNN weights
on AVX512-BF16 CPUs (bench/cpu_gemm.py: 1.4x at 1 row, 1.24x at 32, 1.04x at 2048); it needs
out_features % 16 == 0 and in_features even. LLMSERVE_CPU_GEMM=onednn keeps oneDNN.
"""
from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Callable, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.cpu import native
from kernels.model_view import LinearFn, ModelWeightsView

log = logging.getLogger(__name__)

# the row count oneDNN tunes the blocked layout for; any row count works with it afterwards
BATCH_HINT = 32

WeightsT = TypeVar("WeightsT", bound=ModelWeightsView)


def can_prepack(weight: Tensor) -> bool:
    """True for a bf16 CPU weight when this torch build has oneDNN's linear ops."""
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def prepack(weight: Tensor) -> Tensor:
    """[out, in] bf16 weight -> an opaque oneDNN tensor of the same shape for `packed_linear`."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if not can_prepack(weight):
        raise ValueError(f"cannot prepack a {weight.dtype} weight on {weight.device}: only bf16 "
                         "on a CPU torch build with oneDNN")
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), BATCH_HINT)


def packed_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [rows, in] @ packed weight [out, in]^T (+ bias [out]) -> [rows, out], as F.linear."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def native_available() -> bool:
    """True where the C bf16 kernel is built with AVX512-BF16 and not turned off
    (LLMSERVE_CPU_GEMM=onednn, or LLMSERVE_NATIVE=0 for every C kernel)."""
    if os.environ.get("LLMSERVE_CPU_GEMM", "native") == "onednn":
        return False
    lib = native.load()
    return lib is not None and bool(lib.gemm_bf16_available())


def can_pack_native(weight: Tensor) -> bool:
    """True for a 2-D bf16 CPU weight [out, in] with out % 16 == 0 and even in, when the C
    kernel is available."""
    return (weight.dim() == 2 and weight.device.type == "cpu" and weight.dtype == torch.bfloat16
            and weight.shape[0] % 16 == 0 and weight.shape[1] % 2 == 0 and native_available())


def pack_native(weight: Tensor) -> Tensor:
    """[out, in] bf16 -> [out / 16, in / 2, 32] bf16 for `native_linear`: for each block of 16
    output columns and each pair of input features, the 16 columns' two weights side by side."""
    if not can_pack_native(weight):
        raise ValueError(f"cannot pack a {weight.dtype} weight of shape {tuple(weight.shape)} on "
                         f"{weight.device} for the C kernel: needs bf16 on CPU, out % 16 == 0, "
                         "even in, and an AVX512-BF16 build")
    out_features, in_features = weight.shape
    blocks = weight.reshape(out_features // 16, 16, in_features // 2, 2)
    return blocks.permute(0, 2, 1, 3).reshape(out_features // 16, in_features // 2, 32).contiguous()


def native_linear(x: Tensor, packed: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [rows, in] @ W^T (+ bias [out]) -> [rows, out] bf16, W packed by `pack_native`."""
    if x.dim() != 2 or x.dtype != torch.bfloat16 or x.shape[1] != 2 * packed.shape[1]:
        raise ValueError(f"native_linear: x must be bf16 [rows, {2 * packed.shape[1]}], got "
                         f"{x.dtype} {tuple(x.shape)}")
    if bias is not None and (bias.dtype != torch.bfloat16 or bias.numel() != 16 * packed.shape[0]):
        raise ValueError(f"native_linear: bias must be bf16 [{16 * packed.shape[0]}], got "
                         f"{bias.dtype} {tuple(bias.shape)}")
    lib = native.load()
    assert lib is not None, "native_linear on a weight packed without the C kernel"
    x = x if x.stride(1) == 1 else x.contiguous()
    return native.gemm_bf16(lib, x, packed, bias.contiguous() if bias is not None else None)


def linear_for(weight: Tensor) -> LinearFn:
    """The linear function for weights like this one: native_linear for a 3-D packed weight,
    packed_linear for a oneDNN one, else F.linear."""
    if weight.dim() == 3:
        return native_linear
    return packed_linear if weight.is_mkldnn else F.linear


def _pack_for(weights: ModelWeightsView) -> Callable[[Tensor], Tensor] | None:
    """For the C kernel when every projection fits it, else for oneDNN where torch has it,
    else None (projections stay plain)."""
    projections = [weights.lm_head] + [w for layer in weights.layers for w in (
        layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj)]
    if all(can_pack_native(w) for w in projections):
        return pack_native
    return prepack if can_prepack(weights.lm_head) else None


def prepare_weights(weights: WeightsT) -> WeightsT:
    """The same weights with every projection (and the LM head) packed once for a faster bf16
    product (the C kernel, else oneDNN); embeddings and norms stay plain. Weights neither takes
    (fp32, not on CPU, or a torch without oneDNN) come back unchanged; `linear_for` then gives
    the product that fits."""
    pack = _pack_for(weights)
    if pack is None:
        return weights
    layers = [replace(layer, qkv_proj=pack(layer.qkv_proj), o_proj=pack(layer.o_proj),
                      gate_up_proj=pack(layer.gate_up_proj), down_proj=pack(layer.down_proj))
              for layer in weights.layers]
    log.info("bf16 projections packed once for %s (kernels/cpu/linear.py)",
             "the AVX512-BF16 C kernel" if pack is pack_native else "oneDNN")
    return replace(weights, layers=layers, lm_head=pack(weights.lm_head))
