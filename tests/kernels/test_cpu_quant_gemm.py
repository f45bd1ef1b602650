"""The quantized C projections (kernels/cpu/csrc/gemm_quant.c through kernels/cpu/quant_linear.py)
against torch: a reference that mirrors their arithmetic step by step (int8 activations per row
and group, exact integer dots, the same fp32 operations), and the weight-only oracle
kernels.quant.quantized_linear within what int8 activations and fp16 scales round."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kernels.cpu import linear as cpu_linear
from kernels.cpu import native_quant
from kernels.cpu import quant_linear as ql
from kernels.quant import (QuantizedWeight, dequantize, pack_int4, quantize, quantize_int4,
                           quantized_linear, unpack_int4)

needs_vnni = pytest.mark.skipif(not native_quant.vnni_built(),
                                reason="no AVX512-VNNI build of the C kernels here")
needs_panel = pytest.mark.skipif(not (native_quant.dequant_built()
                                      and cpu_linear.native_available()),
                                 reason="no AVX512-BF16 build of the C kernels here")
needs_lib = pytest.mark.skipif(native_quant.load() is None, reason="no C library here")

ROWS = (1, 3, 17, 33, 300)
# (kind, group, in, source): in = 32 * odd and 64 * odd; GGUF-like (Q8_0, Q4_1: random levels,
# fp16 scales and offsets), kernels.quant's own (int8 symmetric, int4 min/max), or symmetric
# int4 (GGUF Q4_0's form, offsets -8 * scales: packed without offsets)
LAYOUTS = [("int8", 32, 96, "gguf"), ("int8", 64, 320, "own"), ("int4", 32, 224, "gguf"),
           ("int4", 64, 192, "own"), ("int4", 32, 160, "q4_0")]
OUTS = (48, 208)   # 3 and 13 blocks of 16 columns


def gguf_like(kind: str, group: int, out_features: int, in_features: int,
              seed: int) -> QuantizedWeight:
    """Q8_0 / Q4_1-like: random levels, fp16 scales and (int4) fp16 offsets of either sign."""
    gen = torch.Generator().manual_seed(seed)
    groups = in_features // group
    scales = (torch.rand(out_features, groups, generator=gen) * 0.02 + 1e-3).half().float()
    if kind == "int8":
        levels = torch.randint(-127, 128, (out_features, in_features), generator=gen)
        return QuantizedWeight("int8", levels.to(torch.int8), scales, None, group)
    levels = torch.randint(0, 16, (out_features, in_features), generator=gen).to(torch.uint8)
    offsets = (-8 * scales + torch.randn(out_features, groups, generator=gen) * 0.01).half()
    return QuantizedWeight("int4", pack_int4(levels), scales, offsets.float(), group)


def packed_scales(weight: QuantizedWeight, packed: ql.PackedQuant,
                  unscaled: bool = True) -> tuple[torch.Tensor, ...]:
    """The scales (and offsets) the kernels use, from the unpacked weight: fp16 after 2^shift
    (the VNNI kernel's), times unscale when `unscaled` (the dequantizing kernels'), float32
    [out, groups]."""
    factor, back = 1.0 / packed.unscale, packed.unscale if unscaled else 1.0

    def rounded(values: torch.Tensor) -> torch.Tensor:
        return (values * factor).half().float() * back

    scales = rounded(weight.scales)
    if weight.offsets is None:
        return scales, None
    # symmetric int4 packs no offsets: -8 * the scale, in fp32
    return scales, rounded(weight.offsets) if packed.offsets is not None else -8 * scales


def levels_of(weight: QuantizedWeight) -> torch.Tensor:
    """float32 [out, in] levels (int8 values, or int4 0..15)."""
    q = weight.qweight if weight.kind == "int8" else unpack_int4(weight.qweight)
    return q.float()


def quantize_activations(x: torch.Tensor, group: int,
                         unscale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As quantize_row in gemm_quant.c: q [rows, groups, group], scales and sums [rows, groups]."""
    rows, width = x.shape
    xf = x.float().reshape(rows, width // group, group)
    top = xf.abs().amax(dim=2)
    # a true division (torch's `127.0 / top` multiplies by a rounded reciprocal)
    inverse = torch.where(top > 0, torch.full_like(top, 127.0) / top, torch.zeros_like(top))
    q = torch.round(xf * inverse.unsqueeze(2))
    return q, top / 127.0 * unscale, q.sum(dim=2)


def mirror(x: torch.Tensor, weight: QuantizedWeight, packed: ql.PackedQuant,
           bias: torch.Tensor | None) -> torch.Tensor:
    """The VNNI kernel's arithmetic in torch, fp32 [rows, out] before the output rounding."""
    out_features, in_features = weight.shape
    group, groups = weight.group_size, in_features // weight.group_size
    q, x_scales, x_sums = quantize_activations(x, group, packed.unscale)
    levels = levels_of(weight).reshape(out_features, groups, group)
    scales, offsets = packed_scales(weight, packed, unscaled=False)
    integer_offset = weight.kind == "int4" and packed.offsets is None   # symmetric int4
    if integer_offset:
        levels = levels - 8
    dots = torch.einsum("rgk,ogk->rog", q.double(), levels.double()).float()   # exact integers
    acc = torch.zeros(x.shape[0], out_features)
    for g in range(groups):
        if weight.kind == "int8" or integer_offset:
            acc = acc + dots[:, :, g] * (scales[:, g][None, :] * x_scales[:, g][:, None])
        else:
            t = (dots[:, :, g] * scales[:, g][None, :]
                 + x_sums[:, g][:, None] * offsets[:, g][None, :])
            acc = acc + t * x_scales[:, g][:, None]
    return acc + bias.float() if bias is not None else acc


def mirror_dequantized(weight: QuantizedWeight, packed: ql.PackedQuant) -> torch.Tensor:
    """fp32 [out, in]: scale * level (+ offset) with the packed scales."""
    out_features, in_features = weight.shape
    groups = in_features // weight.group_size
    scales, offsets = packed_scales(weight, packed)
    w = levels_of(weight).reshape(out_features, groups, weight.group_size) * scales.unsqueeze(2)
    if offsets is not None:
        w = w + offsets.unsqueeze(2)
    return w.reshape(out_features, in_features)


def oracle_bound(x: torch.Tensor, weight: QuantizedWeight, reference: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """What may separate the kernel from the weight-only oracle: each activation off by half
    its int8 step, fp16 scales (2^-11 relative, twice over for offsets), two bf16 roundings
    of the output and fp32 sums."""
    out_features, group = weight.shape[0], weight.group_size
    weight_abs = dequantize(weight).abs()
    half_step = x.float().abs().reshape(x.shape[0], -1, group).amax(2) / 254.0   # [rows, groups]
    per_group = weight_abs.reshape(out_features, -1, group).sum(2)              # [out, groups]
    activation = half_step.double() @ per_group.double().T
    products = x.double().abs() @ weight_abs.double().T
    scale = 2.0**-10 * products + 2.0**-7 * reference.double().abs()
    if bias is not None:
        scale = scale + 2.0**-8 * bias.double().abs()
    return activation * 1.01 + scale + 1e-6


def _case(kind, group, in_features, out_features, rows, seed, with_bias, source="gguf"):
    torch.manual_seed(seed)
    plain = torch.randn(out_features, in_features) * 0.05
    if source == "gguf":
        weight = gguf_like(kind, group, out_features, in_features, seed)
    elif source == "q4_0":
        weight = quantize_int4(plain, group, symmetric=True)
    else:
        weight = quantize(plain, kind, group)
    x = torch.randn(rows, in_features, dtype=torch.bfloat16)
    x[0, :group] = 0.0   # an all-zero group: scale 0, no division by zero
    bias = torch.randn(out_features, dtype=torch.bfloat16) if with_bias else None
    return weight, x, bias


@needs_vnni
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("kind, group, in_features, source", LAYOUTS)
@pytest.mark.parametrize("out_features", OUTS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_vnni_kernel_equals_its_mirror_and_the_oracle(rows, kind, group, in_features, source,
                                                      out_features, with_bias) -> None:
    weight, x, bias = _case(kind, group, in_features, out_features, rows,
                            rows * 7 + out_features + group, with_bias, source)
    packed = ql.pack(weight)
    y = ql.vnni_linear(x, packed, bias)
    assert y.shape == (rows, out_features) and y.dtype == torch.bfloat16
    exact = mirror(x, weight, packed, bias)
    # the same operations, in another fp32 order at most: y is the bf16 rounding of a value
    # within fp32 rounding of the terms (2^-20 of their magnitudes) of the mirror's sum
    terms = x.float().abs() @ dequantize(weight).abs().T
    if bias is not None:
        terms = terms + bias.float().abs()
    low = (exact - 2.0**-20 * terms).to(torch.bfloat16)
    high = (exact + 2.0**-20 * terms).to(torch.bfloat16)
    assert ((y >= low) & (y <= high)).all()
    assert (y == exact.to(torch.bfloat16)).float().mean() >= 0.98
    oracle = quantized_linear(x, weight, bias)
    error = (y.double() - oracle.double()).abs()
    assert (error <= oracle_bound(x, weight, oracle, bias)).all()


@needs_vnni
@pytest.mark.parametrize("kind, group, in_features, source", LAYOUTS)
def test_vnni_kernel_in_fp32_is_the_mirror_within_fp32_sums(kind, group, in_features,
                                                           source) -> None:
    weight, x, bias = _case(kind, group, in_features, 80, 9, 5, True, source)
    x, bias = x.float(), bias.float()
    packed = ql.pack(weight)
    y = ql.vnni_linear(x, packed, bias)
    assert y.dtype == torch.float32
    exact = mirror(x, weight, packed, bias)
    assert torch.allclose(y, exact, rtol=1e-6, atol=1e-6)
    assert ql.quant_linear(x, packed, bias).dtype == torch.float32


@needs_vnni
@pytest.mark.parametrize("group, in_features", [(32, 96), (64, 320), (32, 224)])
def test_activation_quantization_is_the_mirror_exactly(group, in_features) -> None:
    torch.manual_seed(group)
    x = torch.randn(17, in_features, dtype=torch.bfloat16) * 3
    x[2, group:2 * group] = 0.0
    unscale = 2.0**-9
    q, scales, sums = native_quant.quantize_rows(x, group, unscale)
    want_q, want_scales, want_sums = quantize_activations(x, group, unscale)
    assert torch.equal(q.float(), want_q.reshape(17, in_features))
    assert torch.equal(scales, want_scales) and torch.equal(sums.float(), want_sums)


@needs_lib
@pytest.mark.parametrize("kind, group, in_features, source", LAYOUTS)
def test_packing_keeps_levels_scales_offsets_and_reports_shape_and_bytes(kind, group,
                                                                         in_features,
                                                                         source) -> None:
    weight = _case(kind, group, in_features, 48, 1, 3, False, source)[0]
    packed = ql.pack(weight)
    assert packed.shape == (48, in_features)
    with_offsets = kind == "int4" and source != "q4_0"   # symmetric int4 packs none
    assert (packed.offsets is not None) == with_offsets
    held = packed.data.numel() + 2 * packed.scales.numel() * (2 if with_offsets else 1)
    assert packed.nbytes == held
    assert packed.nbytes <= weight.nbytes    # fp16 scales: never more than the fp32 format
    assert torch.equal(ql.dequantize(packed), mirror_dequantized(weight, packed))
    if source == "gguf":   # GGUF's fp16 scales and offsets survive the power-of-two shift
        assert torch.equal(packed_scales(weight, packed)[0], weight.scales)
        assert torch.equal(ql.dequantize(packed), dequantize(weight))
        assert torch.equal(ql.dequantize(packed, torch.bfloat16),
                           dequantize(weight).to(torch.bfloat16))


@needs_lib
def test_own_fp32_scales_round_to_fp16_within_2_to_the_minus_11() -> None:
    weight = quantize(torch.randn(32, 64) * 1e-4, "int8", 32)   # tiny scales: shifted up
    packed = ql.pack(weight)
    assert packed.unscale < 2.0**-10
    exact = dequantize(weight)
    assert ((ql.dequantize(packed) - exact).abs() <= exact.abs() * 2.0**-11 + 1e-12).all()


@needs_panel
@pytest.mark.parametrize("rows", (1, 17, 300))
@pytest.mark.parametrize("kind, group, in_features, source", LAYOUTS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_panel_and_dense_routes_are_the_bf16_products_of_the_dequantized_weight(
        rows, kind, group, in_features, source, with_bias) -> None:
    weight, x, bias = _case(kind, group, in_features, 208, rows, rows + group, with_bias,
                            source)
    packed = ql.pack(weight)
    dequantized = mirror_dequantized(weight, packed).to(torch.bfloat16)   # [out, in]
    panel = ql.panel_linear(x, packed, bias)
    assert torch.equal(panel, cpu_linear.native_linear(x, cpu_linear.pack_native(dequantized),
                                                       bias))
    assert torch.equal(ql.dense_linear(x, packed, bias), F.linear(x, dequantized, bias))
    oracle = quantized_linear(x, weight, bias)   # fp32 weights: bf16 ones round by 2^-9
    bound = 2.0**-8 * (x.double().abs() @ dequantized.double().abs().T) \
        + 2.0**-7 * oracle.double().abs() + 1e-6
    assert ((panel.double() - oracle.double()).abs() <= bound).all()


def _routes_taken(packed, x, monkeypatch) -> list[str]:
    taken = []
    for route in ql.ROUTES:
        original = ql._ROUTE_FNS[route]

        def spy(*args, route=route, original=original):
            taken.append(route)
            return original(*args)
        monkeypatch.setitem(ql._ROUTE_FNS, route, spy)
    ql.quant_linear(x, packed)
    return taken


@needs_lib
@pytest.mark.parametrize("mode, vnni, want", [
    ("auto", "1", "vnni"), ("native", "1", "vnni"), ("onednn", "1", "dense"),
    ("dequant", "1", "panel"), ("auto", "0", "panel")])
def test_forced_routes_and_the_fallback_without_vnni(mode, vnni, want, monkeypatch) -> None:
    monkeypatch.setenv("LLMSERVE_CPU_GEMM", mode)
    monkeypatch.setenv("LLMSERVE_CPU_VNNI", vnni)
    if want == "vnni" and not native_quant.vnni_built():
        want = "panel"
    if want == "panel" and not native_quant.dequant_built():
        want = "dense"
    weight, x, bias = _case("int4", 32, 96, 48, 5, 11, False)
    packed = ql.pack(weight)
    assert set(packed.routes) == {want}
    assert _routes_taken(packed, x, monkeypatch) == [want]
    y = ql.quant_linear(x, packed)
    oracle = quantized_linear(x, weight)
    assert ((y.double() - oracle.double()).abs() <= oracle_bound(x, weight, oracle, None)).all()


@needs_lib
def test_quant_linear_takes_the_route_of_the_row_bucket_and_a_strided_view() -> None:
    weight, x, _ = _case("int8", 32, 96, 48, 40, 2, False)
    routes = ("vnni", "panel", "dense", "vnni", "dense")
    available = {"vnni": native_quant.vnni_built(), "panel": native_quant.dequant_built(),
                 "dense": True}
    packed = ql.pack(weight, tuple(r if available[r] else "dense" for r in routes))
    for rows, route in ((1, packed.routes[0]), (8, packed.routes[1]), (33, packed.routes[2])):
        assert ql.route_for(packed, rows, torch.bfloat16) == route
    wide = torch.randn(6, 200, dtype=torch.bfloat16)
    view = wide[:, 50:146]
    assert torch.equal(ql.quant_linear(view, packed), ql.quant_linear(view.contiguous(), packed))
    with pytest.raises(ValueError, match=r"\[rows, 96\]"):
        ql.quant_linear(torch.randn(3, 64, dtype=torch.bfloat16), packed)
    with pytest.raises(ValueError, match="bias must have 48 values"):
        ql.quant_linear(view, packed, torch.zeros(16, dtype=torch.bfloat16))
    assert math.isclose(packed.unscale, 2.0 ** round(math.log2(packed.unscale)))


def test_pack_refuses_what_the_kernels_cannot_take() -> None:
    weight = quantize(torch.randn(24, 64), "int8", 32)   # out % 16 != 0
    assert not ql.can_pack(weight)
    with pytest.raises(ValueError, match="cannot pack"):
        ql.pack(weight)
