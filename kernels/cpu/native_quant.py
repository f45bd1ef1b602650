"""ctypes bindings of the quantized projections in kernels/cpu/csrc/gemm_quant.c (built into
the one library kernels/cpu/native.py makes): the VNNI kernel, the panel-dequantizing bf16
kernel, the whole-weight dequantization and the activation quantization alone (for tests).
"""
from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from kernels.cpu import native

QUANT_KINDS = {"int8": 0, "int4": 1}   # QUANT_INT8, QUANT_INT4 in csrc/kernels.h
_DTYPES = {torch.bfloat16: 1, torch.float32: 0}
_declared: set[int] = set()


class QuantWeight(ctypes.Structure):
    """quant_weight in csrc/kernels.h: a quantized weight packed for csrc/gemm_quant.c."""

    _fields_ = ([(name, ctypes.c_int64) for name in ("kind", "group", "out", "in_")]
                + [(name, ctypes.c_void_p) for name in ("data", "scales", "offsets")]
                + [("unscale", ctypes.c_float)])


def load() -> ctypes.CDLL | None:
    """The C library (native.load()) with this module's functions declared, or None."""
    lib = native.load()
    if lib is not None and id(lib) not in _declared:
        i64, ptr, i32, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
        weight = ctypes.POINTER(QuantWeight)
        for name in ("gemm_quant_available", "gemm_dequant_available"):
            getattr(lib, name).restype = i32
            getattr(lib, name).argtypes = []
        lib.gemm_quant.restype = i32
        lib.gemm_quant.argtypes = [ptr, i64, i32, weight, ptr, ptr, i64, i64]
        lib.gemm_dequant_bf16.restype = i32
        lib.gemm_dequant_bf16.argtypes = [ptr, i64, weight, ptr, ptr, i64, i64]
        lib.dequantize_weight.restype = i32
        lib.dequantize_weight.argtypes = [weight, ptr, i32]
        lib.quantize_rows.restype = i32
        lib.quantize_rows.argtypes = [ptr, i64, i32, i64, i64, i64, f32, ptr, ptr, ptr]
        _declared.add(id(lib))
    return lib


def vnni_built() -> bool:
    """Whether the library has the AVX512-VNNI kernel (the CPU has VNNI and AVX512-BW)."""
    lib = load()
    return lib is not None and bool(lib.gemm_quant_available())


def dequant_built() -> bool:
    """Whether the library has the panel-dequantizing bf16 kernel (AVX512-BF16)."""
    lib = load()
    return lib is not None and bool(lib.gemm_dequant_available())


def gemm_quant(x: Tensor, weight: QuantWeight, bias: Tensor | None) -> Tensor:
    """x [rows, in] @ W^T (+ bias [out]) in x's dtype (bf16 or fp32, unit column stride; bias
    in x's dtype) through the VNNI kernel."""
    lib = load()
    rows = x.shape[0]
    y = torch.empty((rows, weight.out), dtype=x.dtype)
    status = lib.gemm_quant(x.data_ptr(), x.stride(0), _DTYPES[x.dtype], ctypes.byref(weight),
                            bias.data_ptr() if bias is not None else None, y.data_ptr(),
                            weight.out, rows)
    if status:
        raise MemoryError(f"gemm_quant: status {status} (out of memory, or no VNNI build)")
    return y


def gemm_dequant_bf16(x: Tensor, weight: QuantWeight, bias: Tensor | None) -> Tensor:
    """As gemm_quant for bf16 x (and bias), through bf16 panels and the bf16 kernel's tiles."""
    lib = load()
    rows = x.shape[0]
    y = torch.empty((rows, weight.out), dtype=torch.bfloat16)
    status = lib.gemm_dequant_bf16(x.data_ptr(), x.stride(0), ctypes.byref(weight),
                                   bias.data_ptr() if bias is not None else None, y.data_ptr(),
                                   weight.out, rows)
    if status:
        raise MemoryError(f"gemm_dequant_bf16: status {status} (out of memory, or no BF16 build)")
    return y


def dequantize_weight(weight: QuantWeight, dtype: torch.dtype) -> Tensor:
    """The plain [out, in] weight in dtype (bf16 or fp32): scale * level + offset in fp32."""
    out = torch.empty((weight.out, weight.in_), dtype=dtype)
    if load().dequantize_weight(ctypes.byref(weight), out.data_ptr(), _DTYPES[dtype]):
        raise MemoryError("dequantize_weight: out of memory")
    return out


def quantize_rows(x: Tensor, group: int, unscale: float) -> tuple[Tensor, Tensor, Tensor]:
    """gemm_quant's activation quantization alone, for x [rows, in] (unit column stride):
    (q int8 [rows, in]; scales float32 [rows, in / group]; sums of q int32 [rows, in / group])."""
    rows, width = x.shape
    q = torch.empty((rows, width), dtype=torch.int8)
    scales = torch.empty((rows, width // group), dtype=torch.float32)
    sums = torch.empty((rows, width // group), dtype=torch.int32)
    if load().quantize_rows(x.data_ptr(), x.stride(0), _DTYPES[x.dtype], rows, width, group,
                            unscale, q.data_ptr(), scales.data_ptr(), sums.data_ptr()):
        raise RuntimeError("quantize_rows: no AVX512-VNNI build")
    return q, scales, sums
