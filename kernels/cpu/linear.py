"""bf16 matrix products on CPU, each weight packed once at load: for the C kernel in
kernels/cpu/csrc/gemm_bf16.c where the CPU has AVX512-BF16, else reordered for oneDNN.

`F.linear` on a plain bf16 weight makes oneDNN reorder that weight into its blocked layout on
every call. Reordering once (`torch.ops.mkldnn._reorder_linear_weight`, what inductor's weight
freezing does) gives the same numbers, bit for bit, and measured here (2-core AMD EPYC,
AVX512-BF16, 30 distinct 3072x576 weights): 2.1x faster at 1 row, 1.8x at 32 rows, 1.05x at
2048 rows. fp32 weights gain nothing from it (MKL's sgemm reads them as they are), so they stay.

The C kernel (`pack_native` + `native_linear`) is faster again than the reordered oneDNN weights
on AVX512-BF16 CPUs (bench/cpu_gemm.py: 1.4x at 1 row, 1.24x at 32, 1.04x at 2048); it needs
out_features % 16 == 0 and in_features even.

Which one runs is decided per projection shape and row bucket by measurement at load
(kernels/cpu/gemm_choice.py): every projection is packed for the C kernel, and the shapes where
oneDNN wins some bucket (with AMX: from ~32 rows) also keep a oneDNN copy (that shape's
weights held twice); `chosen_linear` picks per call by the row count. LLMSERVE_CPU_GEMM=native
or =onednn skips the measurement and packs for that one only (the default is auto).

Weight-only int8/int4 projections (kernels.quant.QuantizedWeight, from `--quantization`) are
packed by kernels/cpu/quant_linear.py, their route per bucket measured in the same table; a model
may mix them with bf16 ones (a bf16 LM head over int4 layers). Without the C library they stay
as they are and go through the torch oracle.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from typing import Callable, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.cpu import gemm_choice, native, quant_linear
from kernels.cpu.quant_linear import PackedQuant
from kernels.model_view import LinearFn, ModelWeightsView
from kernels.quant import QuantizedWeight, quantized_linear

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


GEMM_MODES = ("auto", "native", "onednn", "dequant")


def gemm_mode() -> str:
    """LLMSERVE_CPU_GEMM: auto (default: measure per shape and rows), native (the C kernels:
    bf16, VNNI), onednn (oneDNN; quantized weights dequantized for it) or dequant (the C
    kernels; quantized weights dequantized panel by panel)."""
    mode = os.environ.get("LLMSERVE_CPU_GEMM", "auto") or "auto"
    if mode not in GEMM_MODES:
        log.warning("LLMSERVE_CPU_GEMM=%s is not one of %s; using auto", mode, GEMM_MODES)
        return "auto"
    return mode


def native_available() -> bool:
    """True where the C bf16 kernel is built with AVX512-BF16 and not turned off
    (LLMSERVE_CPU_GEMM=onednn, or LLMSERVE_NATIVE=0 for every C kernel)."""
    if gemm_mode() == "onednn":
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


PLAN_ATTR = "llmserve_gemm_plan"   # attribute of a C-packed weight that has a oneDNN twin
PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")   # forward_layers.c's order


@dataclass(slots=True)
class ProjectionPlan:
    """A C-packed weight's oneDNN twin and, per row bucket (gemm_choice.BUCKET_ROWS), whether
    oneDNN runs it (never where there is no twin: the shape's C kernel won every bucket)."""

    onednn: Tensor | None         # the same weight reordered by `prepack`, or None
    use_onednn: tuple[bool, ...]  # one per bucket

    def picks_onednn(self, rows: int) -> bool:
        """Whether a product over `rows` rows goes to oneDNN."""
        return self.use_onednn[gemm_choice.bucket_index(rows)]


def plan_of(weight: Tensor) -> ProjectionPlan | None:
    """The plan attached to a C-packed weight by `prepare_weights`, or None."""
    return weight.__dict__.get(PLAN_ATTR)


def chosen_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """As native_linear, but through the weight's oneDNN twin where its plan picks oneDNN for
    x's row count."""
    plan = weight.__dict__.get(PLAN_ATTR)
    if plan is not None and plan.use_onednn[gemm_choice.bucket_index(x.shape[0])]:
        return packed_linear(x, plan.onednn, bias)
    return native_linear(x, weight, bias)


def linear_for(weight: Tensor) -> LinearFn:
    """The linear function for weights like this one: chosen_linear for a 3-D packed weight with
    a plan, native_linear for one without, packed_linear for a oneDNN one, quant_linear for a
    packed quantized one, the torch oracle for an unpacked one, else F.linear."""
    if isinstance(weight, PackedQuant):
        return quant_linear.quant_linear
    if isinstance(weight, QuantizedWeight):
        return quantized_linear
    if weight.dim() == 3:
        return chosen_linear if plan_of(weight) is not None else native_linear
    return packed_linear if weight.is_mkldnn else F.linear


def _any_linear(x: Tensor, weight, bias: Tensor | None = None) -> Tensor:
    """A packed quantized weight through quant_linear, an unpacked one (no C library) through
    the torch oracle, any other through `linear_for`."""
    if isinstance(weight, PackedQuant):
        return quant_linear.quant_linear(x, weight, bias)
    if isinstance(weight, QuantizedWeight):
        return quantized_linear(x, weight, bias)
    return linear_for(weight)(x, weight, bias)


def _projections(weights: ModelWeightsView) -> list:
    """The LM head, then every layer's projections in forward_layers.c's order."""
    return [weights.lm_head] + [getattr(layer, name) for layer in weights.layers
                                for name in PROJECTIONS]


def _is_quantized(weight) -> bool:
    return isinstance(weight, (QuantizedWeight, PackedQuant))


def model_linear(weights: ModelWeightsView) -> LinearFn:
    """The product for every projection of `weights` as prepare_weights left them."""
    if any(_is_quantized(w) for w in _projections(weights)):
        return _any_linear
    return linear_for(weights.lm_head)


def _pack_for(weights: ModelWeightsView) -> Callable[[Tensor], Tensor] | None:
    """For the plain (unquantized) projections: the C kernel when every one fits it, else
    oneDNN where torch has it, else None (they stay plain)."""
    plain = [w for w in _projections(weights) if not _is_quantized(w)]
    if not plain:
        return None
    if all(can_pack_native(w) for w in plain):
        return pack_native
    return prepack if can_prepack(plain[0]) else None


def _by_shape(weights: ModelWeightsView) -> dict[str, list[Tensor]]:
    """Shape name (qkv, o, gate_up, down, lm_head) -> that projection of every layer."""
    shapes = {name.removesuffix("_proj"): [getattr(layer, name) for layer in weights.layers]
              for name in PROJECTIONS}
    shapes["lm_head"] = [weights.lm_head]
    return shapes


def _candidates(plain: dict[str, list[Tensor]],
                packed: dict[str, list[Tensor]]) -> list[gemm_choice.ShapeCandidates]:
    """What gemm_choice times: the model's own weights, oneDNN twins made on first use
    (quantized shapes: quant_linear.candidates)."""
    out = []
    for name, weights in plain.items():
        if isinstance(packed[name][0], PackedQuant):
            out.extend(quant_linear.candidates(name, packed[name]))
            continue
        out_features, in_features = weights[0].shape
        twins: dict[int, Tensor] = {}

        def run_onednn(x: Tensor, i: int, weights=weights, twins=twins) -> Tensor:
            if i not in twins:
                twins[i] = prepack(weights[i])
            return packed_linear(x, twins[i])

        out.append(gemm_choice.ShapeCandidates(
            name, out_features, in_features, len(weights),
            run_native=lambda x, i, natives=packed[name]: native_linear(x, natives[i]),
            run_onednn=run_onednn,
            make_x=lambda rows, width=in_features: torch.randn(rows, width,
                                                               dtype=torch.bfloat16),
            max_rows=gemm_choice.LM_HEAD_MAX_ROWS if name == "lm_head" else
            gemm_choice.BUCKET_ROWS[-1]))
    return out


def choose_gemms(plain: dict[str, list[Tensor]],
                 packed: dict[str, list[Tensor]]) -> gemm_choice.GemmTable:
    """Measure (or read from the cache) which GEMM each shape uses per bucket; log the table."""
    lib = native.load()   # its file name hashes the C sources, flags and CPU
    identity = {**gemm_choice.cpu_identity(), "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "native_lib": os.path.basename(lib._name) if lib is not None else None,
                "shapes": {name: list(w[0].shape) for name, w in plain.items()},
                "layers": max(len(w) for w in plain.values()),
                "kinds": {name: describe(p[0]) for name, p in packed.items()}}
    table = gemm_choice.choose(_candidates(plain, packed), identity,
                               native.cache_dir().parent / "gemm_choice")
    log.info("%s", gemm_choice.format_table(table))
    return table


def _attach_plans(plain: dict[str, list[Tensor]], packed: dict[str, list[Tensor]],
                  table: gemm_choice.GemmTable) -> None:
    """Quantized shapes take their routes. Where oneDNN wins anywhere, every C-packed bf16
    weight gets a plan (so `chosen_linear` consults it); only the shapes it wins get oneDNN
    twins."""
    for name in table.shapes:
        if isinstance(packed[name][0], PackedQuant):
            quant_linear.take_choices(packed[name], table.shapes[name].choices())
    bf16 = {name: weights for name, weights in plain.items()
            if name in table.shapes and not _is_quantized(packed[name][0])}
    if not any(table.uses_onednn(name) for name in bf16):
        return
    for name, weights in bf16.items():
        use = tuple(choice == gemm_choice.ONEDNN for choice in table.shapes[name].choices())
        for plain_weight, native_weight in zip(weights, packed[name]):
            twin = prepack(plain_weight) if any(use) else None
            setattr(native_weight, PLAN_ATTR, ProjectionPlan(twin, use))


def describe(weight) -> str:
    """How a projection is held, for logs and the chooser's cache key: 'bf16 C', 'int4 g32' ..."""
    if isinstance(weight, PackedQuant):
        symmetric = " symmetric" if weight.kind == "int4" and weight.offsets is None else ""
        return f"{weight.kind} g{weight.group_size}{symmetric}"
    if isinstance(weight, QuantizedWeight):
        return f"{weight.kind} g{weight.group_size} (torch oracle)"
    dtype = str(weight.dtype).removeprefix("torch.")
    return f"{dtype} {'C' if weight.dim() == 3 else 'oneDNN' if weight.is_mkldnn else 'plain'}"


def _pack_quantized(weights: ModelWeightsView) -> Callable | None:
    """quant_linear.pack when the C library takes every quantized projection, else None (they
    stay QuantizedWeight, for the torch oracle)."""
    quantized = [w for w in _projections(weights) if isinstance(w, QuantizedWeight)]
    if quantized and all(quant_linear.can_pack(w) for w in quantized):
        return quant_linear.pack
    return None


def _measured(plain: dict[str, list], packed: dict[str, list], pack: Callable | None) -> dict:
    """The shapes the chooser weighs: quantized ones with two routes to choose from, bf16
    ones packed for the C kernel where oneDNN is there to compare."""
    chosen = {}
    for name, weights in packed.items():
        if isinstance(weights[0], PackedQuant):
            if quant_linear.choosable(weights):
                chosen[name] = weights
        elif pack is pack_native and isinstance(weights[0], Tensor) and weights[0].dim() == 3 \
                and can_prepack(plain[name][0]):
            chosen[name] = weights
    return chosen


def prepare_weights(weights: WeightsT) -> WeightsT:
    """The same weights with every projection (and the LM head) packed once for a faster
    product: bf16 ones for the C kernel (else oneDNN), quantized ones for the C quantized
    kernels; embeddings and norms stay plain. Weights neither takes (fp32, not on CPU, or no
    C library and no oneDNN) come back unchanged; `model_linear` then gives the product that
    fits. With LLMSERVE_CPU_GEMM=auto, the route per shape and row bucket is measured
    (gemm_choice): oneDNN twins for the bf16 shapes where it wins, and the quantized shapes'
    VNNI or dequantized routes."""
    pack, pack_quantized = _pack_for(weights), _pack_quantized(weights)
    if pack is None and pack_quantized is None:
        return weights

    def packed_form(weight):
        if isinstance(weight, QuantizedWeight):
            return pack_quantized(weight) if pack_quantized is not None else weight
        return pack(weight) if pack is not None else weight

    layers = [replace(layer, **{name: packed_form(getattr(layer, name)) for name in PROJECTIONS})
              for layer in weights.layers]
    packed_weights = replace(weights, layers=layers, lm_head=packed_form(weights.lm_head))
    chosen = ""
    plain, packed = _by_shape(weights), _by_shape(packed_weights)
    measured = _measured(plain, packed, pack) if gemm_mode() == "auto" else {}
    if measured:
        table = choose_gemms({name: plain[name] for name in measured}, measured)
        _attach_plans(plain, packed, table)
        twins = [name for name in measured if table.uses_onednn(name)]
        dequantized = [name for name in measured if gemm_choice.DEQUANT in table.shapes[name]
                       .choices()]
        chosen = (f"; oneDNN twins for {', '.join(twins) or 'no shape'}; dequantized to bf16 at "
                  f"some row counts: {', '.join(dequantized) or 'no shape'}")
    kinds = sorted({describe(w) for w in _projections(packed_weights)})
    log.info("projections packed once (kernels/cpu/linear.py): %s%s", ", ".join(kinds), chosen)
    return packed_weights
