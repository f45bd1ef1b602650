"""Pick the kernel implementation: Triton on CUDA (kernels/triton), the CPU path (kernels/cpu)
on CPU. Both fill the same `KernelOps`, so the model never names a backend's modules.

Importing this module imports neither Triton nor any Triton kernel; `get_ops("triton")` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from kernels import reference
from kernels.cpu import layer_loop as cpu_layer_loop
from kernels.cpu import linear as cpu_linear
from kernels.cpu import ops as cpu_ops
from kernels.model_view import LayerLoop, LinearFn, ModelConfigView, ModelWeightsView
from kernels.triton.launch import interpret_mode

BACKENDS = ("auto", "triton", "torch")


@dataclass(frozen=True, slots=True)
class KernelOps:
    """The model ops of one backend; the kernel ops share the signatures in kernels.reference."""

    backend: str
    rms_norm: Callable
    build_rope_cache: Callable
    apply_rope: Callable
    silu_and_mul: Callable
    store_kv: Callable
    rope_and_store_kv: Callable   # apply_rope then store_kv, fused where a backend can
    prefill_attention: Callable
    decode_attention: Callable
    # model-level extras: the CPU backend's fast path, plain torch elsewhere
    prepare_weights: Callable     # (ModelWeights) -> ModelWeights, projections packed once
    # (ModelWeights as prepare_weights left them) -> the product for every projection of them
    model_linear: Callable[[ModelWeightsView], LinearFn]
    # (config, weights, cos_sin, scale) -> every layer in one call, or None (Python loop)
    layer_loop: Callable[[ModelConfigView, ModelWeightsView, Tensor, float], LayerLoop | None]
    argmax_rows: Callable[[Tensor], Tensor]   # [rows, cols] float32 -> [rows] int64


def resolve_backend(requested: str, device: torch.device) -> str:
    """Map `auto|triton|torch` to a concrete backend for `device`, or raise ValueError."""
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    device = torch.device(device)
    if requested == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if requested == "triton" and device.type != "cuda" and not interpret_mode():
        raise ValueError(
            f"backend 'triton' needs a CUDA device (got {device.type!r}); on CPU use 'torch', "
            "or set TRITON_INTERPRET=1 before starting to run the Triton kernels in the (slow) interpreter"
        )
    return requested


def _no_layer_loop(config: ModelConfigView, weights: ModelWeightsView, cos_sin: Tensor,
                   scale: float) -> None:
    """Triton: the layers run one kernel call at a time (CUDA graphs remove the overhead)."""
    return None


def get_ops(backend: str) -> KernelOps:
    """Return the ops for a concrete backend ('torch' or 'triton')."""
    if backend == "torch":
        return KernelOps(
            backend="torch",
            rms_norm=cpu_ops.rms_norm,
            build_rope_cache=cpu_ops.build_rope_cache,
            apply_rope=cpu_ops.apply_rope,
            silu_and_mul=cpu_ops.silu_and_mul,
            store_kv=cpu_ops.store_kv,
            rope_and_store_kv=cpu_ops.rope_and_store_kv,
            prefill_attention=cpu_ops.prefill_attention,
            decode_attention=cpu_ops.decode_attention,
            prepare_weights=cpu_linear.prepare_weights,
            model_linear=cpu_linear.model_linear,
            layer_loop=cpu_layer_loop.NativeLayerLoop.create,
            argmax_rows=cpu_ops.argmax_rows,
        )
    if backend == "triton":
        from kernels.triton import quant_gemm, quant_pack
        from kernels.triton.decode_attention import decode_attention
        from kernels.triton.prefill_attention import prefill_attention
        from kernels.triton.rmsnorm import rms_norm
        from kernels.triton.rope import apply_rope
        from kernels.triton.silu_mul import silu_and_mul
        from kernels.triton.store_kv import store_kv

        return KernelOps(
            backend="triton",
            rms_norm=rms_norm,
            build_rope_cache=reference.build_rope_cache,
            apply_rope=apply_rope,
            silu_and_mul=silu_and_mul,
            store_kv=store_kv,
            rope_and_store_kv=reference.rope_then_store(apply_rope, store_kv),
            prefill_attention=prefill_attention,
            decode_attention=decode_attention,
            # quantized projections packed once for the W8A16/W4A16 GEMM; plain ones stay
            prepare_weights=quant_pack.prepare_weights,
            model_linear=quant_gemm.model_linear,
            layer_loop=_no_layer_loop,
            argmax_rows=reference.argmax_rows,
        )
    raise ValueError(f"backend must be 'torch' or 'triton' (resolve 'auto' first), got {backend!r}")
