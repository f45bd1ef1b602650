"""Every decoder layer in one C call (kernels/cpu/csrc/forward_layers.c) for bf16 models on CPU,
their projections bf16 or weight-only int8/int4 (kernels/cpu/quant_linear.py).

The C loop runs the kernels the Python loop in `LlamaModel._layers` (engine_svc/models/llama.py)
would call, in its order and on the same values, so logits are identical; it saves the per-layer
Python, ctypes crossings and tensor allocations. Taken when the projections are packed for the C
bf16 kernel and the model runs on the CPU ops; LLMSERVE_CPU_LAYERS=python keeps the Python loop.
tests/engine/test_native_layers.py holds the two loops to bit-for-bit equality.

Where the measured GEMM choice (kernels/cpu/gemm_choice.py) picks oneDNN for a projection at
the step's row count, the C loop calls back into Python for that projection (oneDNN on the
weight's twin, as `linear.chosen_linear` does in the Python loop; for a quantized weight its
"dense" route): one ctypes callback per layer and projection, only at the row counts where
oneDNN won. A quantized weight's VNNI and panel routes run in C, as quant_linear would.
"""
from __future__ import annotations

import ctypes
import os

import torch
from torch import Tensor

from kernels.cpu import linear, native, ops, quant_linear
from kernels.cpu.quant_linear import PackedQuant
from kernels.model_view import KVCacheView, ModelConfigView, ModelWeightsView, StepBatchView

_ERRORS = {-1: (IndexError, "a pool row of a new token is outside the pool"),
           -2: (IndexError, "a position is outside the RoPE table"),
           -3: (IndexError, "a slot or sequence length is outside the request table"),
           -4: (RuntimeError, "pool attention: unsupported sizes or out of memory"),
           -5: (RuntimeError, "a projection through oneDNN failed"),
           -6: (MemoryError, "a quantized projection ran out of memory")}


class NativeLayerLoop:
    """Runs all decoder layers of a packed bf16 (or weight-only quantized) model through
    forward_layers."""

    def __init__(self, config: ModelConfigView, weights: ModelWeightsView, cos_sin: Tensor,
                 scale: float, lib: ctypes.CDLL) -> None:
        self.config, self.weights, self.scale, self.lib = config, weights, scale, lib
        self.cos_sin = cos_sin   # [max_positions, head_dim] fp32
        self._bound: tuple[KVCacheView, ctypes.Array, native.LayerStack] | None = None
        # per projection (forward_layers.c's order): the plans of every layer, or None
        self.plans = [_layer_plans(weights, name) for name in linear.PROJECTIONS]
        self._io: list[tuple[Tensor, Tensor]] = []   # this step's (x, y) per projection
        self._hook_error: BaseException | None = None
        self._hook = native.GemmHook(self._run_hook)   # kept alive with the loop

    @classmethod
    def create(cls, config: ModelConfigView, weights: ModelWeightsView, cos_sin: Tensor,
               scale: float) -> NativeLayerLoop | None:
        """The C layer loop for this model, or None where it does not apply (then the Python
        loop runs): projections not packed for the C kernel, no C library, attention sizes
        the C kernel does not take, or LLMSERVE_CPU_LAYERS=python. Only the CPU backend's
        KernelOps offers it (the Triton backend's layer_loop is always None)."""
        if os.environ.get("LLMSERVE_CPU_LAYERS", "native") == "python":
            return None
        if not all(_same_kind(weights, name) for name in linear.PROJECTIONS):
            return None   # packed neither for the C bf16 kernel nor the quantized ones
        for layer in weights.layers:
            for vector in (layer.input_norm, layer.post_norm, layer.qkv_bias):
                if vector is not None and (vector.dtype != torch.bfloat16
                                           or not vector.is_contiguous()):
                    return None   # the C loop reads norms and biases as plain bf16 arrays
        lib = native.load()
        group = config.num_heads // config.num_kv_heads
        if (lib is None or group > native.MAX_GROUP or config.head_dim > native.MAX_HEAD_DIM
                or cos_sin.dtype != torch.float32 or not cos_sin.is_contiguous()):
            return None
        return cls(config, weights, cos_sin, scale, lib)

    def _bind(self, cache: KVCacheView) -> tuple[ctypes.Array, native.LayerStack]:
        """The C structs for these pools (built once per cache object)."""
        if self._bound is not None and self._bound[0] is cache:
            return self._bound[1], self._bound[2]
        k0, table = cache.k[0], cache.req_to_token
        for k, v in zip(cache.k, cache.v):
            if (k.dtype != torch.bfloat16 or k.stride() != k0.stride() or v.stride() != k0.stride()
                    or k.shape != k0.shape or v.shape != k0.shape or k.stride(2) != 1):
                raise ValueError("forward_layers: every K/V pool must be bf16 with one shape and "
                                 "the same strides (unit last stride)")
        if not table.is_contiguous() or table.dtype != torch.int32:
            raise ValueError("forward_layers: req_to_token must be contiguous int32")
        ptr = _ptr
        layers = (native.LayerTensors * len(self.weights.layers))(*[
            native.LayerTensors(ptr(w.input_norm), ptr(w.qkv_proj), ptr(w.qkv_bias),
                                ptr(w.o_proj), ptr(w.post_norm), ptr(w.gate_up_proj),
                                ptr(w.down_proj), ptr(k), ptr(v), _quantized_bits(w))
            for w, k, v in zip(self.weights.layers, cache.k, cache.v)])
        cfg = self.config
        stack = native.LayerStack(
            cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
            cfg.intermediate_size, cfg.rms_norm_eps, self.scale, k0.shape[0], k0.stride(0),
            k0.stride(1), table.data_ptr(), table.shape[0], table.shape[1],
            self.cos_sin.data_ptr(), self.cos_sin.shape[0])
        self._bound = (cache, layers, stack)
        return layers, stack

    def run(self, hidden: Tensor, batch: StepBatchView,
            cache: KVCacheView) -> tuple[Tensor, Tensor]:
        """hidden: the embeddings [tokens, hidden] (overwritten) -> (last layer's output,
        residual stream), as the Python loop leaves them."""
        layers, stack = self._bind(cache)
        cfg, tokens = self.config, hidden.shape[0]
        slots, seq_lens = self._queries(batch, tokens)
        positions = batch.positions.to(torch.int64).contiguous()
        out_rows = batch.out_rows.to(torch.int64).contiguous()

        def scratch(width: int) -> Tensor:
            return torch.empty((tokens, width), dtype=torch.bfloat16)

        q_size = cfg.num_heads * cfg.head_dim
        residual, normed = scratch(cfg.hidden_size), scratch(cfg.hidden_size)
        qkv = scratch(q_size + 2 * cfg.num_kv_heads * cfg.head_dim)
        attn, gate_up, act = (scratch(q_size), scratch(2 * cfg.intermediate_size),
                              scratch(cfg.intermediate_size))
        hooked = self.hooked_mask(tokens)
        step = native.StepTensors(tokens, *(t.data_ptr() for t in (
            positions, out_rows, slots, seq_lens, hidden, residual, normed, qkv, attn, gate_up,
            act)), hooked, ctypes.cast(self._hook, ctypes.c_void_p) if hooked else None,
            self.dequant_mask(tokens))
        # (x, y) of qkv, o, gate_up, down, as forward_layers.c passes them to gemm_bf16
        self._io = [(normed, qkv), (attn, hidden), (normed, gate_up), (act, hidden)]
        self._hook_error = None
        try:
            status = self.lib.forward_layers(ctypes.byref(stack), layers, ctypes.byref(step))
        finally:
            self._io = []
        if status:
            error, message = _ERRORS.get(status, (RuntimeError, f"status {status}"))
            raise error(f"forward_layers: {message}") from self._hook_error
        return hidden, residual

    def _routes(self, rows: int) -> list[str | None]:
        """Each projection's quantized route at this row count (None: a bf16 projection)."""
        first = self.weights.layers[0]
        return [quant_linear.route_for(weight, rows, torch.bfloat16)
                if isinstance(weight, PackedQuant) else None
                for weight in (getattr(first, name) for name in linear.PROJECTIONS)]

    def hooked_mask(self, rows: int) -> int:
        """Bit i set: projection i (qkv, o, gate_up, down) goes to oneDNN at this row count
        (a bf16 weight's twin, or a quantized weight's dense route)."""
        routes = self._routes(rows)
        return sum(1 << which for which, plans in enumerate(self.plans)
                   if routes[which] == "dense"
                   or (plans is not None and plans[0].picks_onednn(rows)))

    def dequant_mask(self, rows: int) -> int:
        """Bit i set: quantized projection i goes through dequantized panels at this row count."""
        return sum(1 << which for which, route in enumerate(self._routes(rows))
                   if route == "panel")

    def _run_hook(self, layer: int, which: int) -> int:
        """forward_layers' callback: projection `which` of `layer` through oneDNN."""
        try:
            x, y = self._io[which]
            weights = self.weights.layers[layer]
            bias = weights.qkv_bias if which == 0 else None
            weight = getattr(weights, linear.PROJECTIONS[which])
            if isinstance(weight, PackedQuant):
                y.copy_(quant_linear.dense_linear(x, weight, bias))
            else:
                y.copy_(linear.packed_linear(x, self.plans[which][layer].onednn, bias))
            return 0
        except BaseException as error:   # noqa: BLE001 - C cannot take it: re-raised in run
            self._hook_error = error
            return 1

    @staticmethod
    def _queries(batch: StepBatchView, tokens: int) -> tuple[Tensor, Tensor]:
        """(table slot, visible keys) of every token: decode requests first, then each prefill
        token as a query of its own."""
        nd = batch.num_decode
        slots, seq_lens = batch.slots[:nd], batch.seq_lens
        if nd < tokens:
            token_slots, visible = ops.per_token_queries(batch.slots[nd:], batch.prefix_lens,
                                                         batch.cu_new_lens, tokens - nd)
            slots, seq_lens = torch.cat([slots, token_slots]), torch.cat([seq_lens, visible])
        return slots.to(torch.int32).contiguous(), seq_lens.to(torch.int32).contiguous()


def _same_kind(weights: ModelWeightsView, name: str) -> bool:
    """Whether projection `name` is packed for the C kernels in every layer, all bf16 or all
    quantized with the same routes (the step's masks are per projection, not per layer)."""
    projections = [getattr(layer, name) for layer in weights.layers]
    if all(isinstance(w, PackedQuant) for w in projections):
        return len({w.routes for w in projections}) == 1
    return all(isinstance(w, Tensor) and w.dim() == 3 and w.dtype == torch.bfloat16
               for w in projections)


def _quantized_bits(layer) -> int:
    """Bit i set: projection i of this layer is a quantized weight."""
    return sum(1 << which for which, name in enumerate(linear.PROJECTIONS)
               if isinstance(getattr(layer, name), PackedQuant))


def _layer_plans(weights: ModelWeightsView, name: str) -> list[linear.ProjectionPlan] | None:
    """Every layer's plan for projection `name`, or None when that shape has no oneDNN twins."""
    projections = [getattr(layer, name) for layer in weights.layers]
    plans = [linear.plan_of(w) if isinstance(w, Tensor) else None for w in projections]
    if any(plan is None or plan.onednn is None for plan in plans):
        return None
    return plans  # type: ignore[return-value]


def _ptr(tensor: Tensor | PackedQuant | None) -> int | None:
    """A tensor's data, a quantized weight's quant_weight struct (kept alive by the weight)."""
    if isinstance(tensor, PackedQuant):
        return ctypes.addressof(tensor.struct)
    return tensor.data_ptr() if tensor is not None else None

