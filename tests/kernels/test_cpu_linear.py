"""Prepacked bf16 projections: oneDNN reordered weights give F.linear's numbers bit for bit;
the C kernel (kernels/cpu/csrc/gemm_bf16.c) gives the exact product within bf16 rounding;
quantized and mixed models get their projections packed (kernels/cpu/quant_linear.py)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from kernels.cpu import linear as cpu_linear
from kernels.cpu import quant_linear
from kernels.quant import QuantizedWeight, quantize, quantized_linear

needs_native = pytest.mark.skipif(not cpu_linear.native_available(),
                                  reason="no AVX512-BF16 build of the C kernels here")
needs_onednn = pytest.mark.skipif(
    not cpu_linear.can_prepack(torch.zeros(1, 1, dtype=torch.bfloat16)),
    reason="this torch build has no oneDNN bf16 linear")


@needs_onednn
@pytest.mark.parametrize("rows", [0, 1, 3, 32, 257])
def test_packed_linear_equals_f_linear(rows: int) -> None:
    torch.manual_seed(0)
    weight = torch.randn(96, 40, dtype=torch.bfloat16)
    bias = torch.randn(96, dtype=torch.bfloat16)
    packed = cpu_linear.prepack(weight)
    assert packed.is_mkldnn and packed.shape == weight.shape
    assert cpu_linear.linear_for(packed) is cpu_linear.packed_linear
    x = torch.randn(rows, 40, dtype=torch.bfloat16)
    assert torch.equal(cpu_linear.packed_linear(x, packed), F.linear(x, weight))
    assert torch.equal(cpu_linear.packed_linear(x, packed, bias), F.linear(x, weight, bias))


@needs_onednn
def test_packed_linear_takes_a_strided_view() -> None:
    weight = torch.randn(16, 24, dtype=torch.bfloat16)
    wide = torch.randn(5, 48, dtype=torch.bfloat16)
    x = wide[:, 8:32]
    assert torch.equal(cpu_linear.packed_linear(x, cpu_linear.prepack(weight)), F.linear(x, weight))


def test_prepack_refuses_what_it_cannot_pack() -> None:
    assert not cpu_linear.can_prepack(torch.zeros(4, 4))
    assert cpu_linear.linear_for(torch.zeros(4, 4)) is F.linear
    with pytest.raises(ValueError, match="only bf16"):
        cpu_linear.prepack(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="2-D"):
        cpu_linear.prepack(torch.zeros(4, dtype=torch.bfloat16))


def _exact(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    exact = x.double() @ weight.double().T
    return exact + bias.double() if bias is not None else exact


@needs_native
@pytest.mark.parametrize("rows", [0, 1, 7, 8, 9, 33, 300])
@pytest.mark.parametrize("out_features, in_features", [(16, 2), (32, 40), (48, 64), (80, 96),
                                                       (112, 1536)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_native_linear_is_the_product_within_bf16_rounding(rows, out_features, in_features,
                                                           with_bias) -> None:
    """Every tile shape (1-8 rows, 1-3 column blocks, chunks of rows at in=1536) and the bias."""
    torch.manual_seed(rows * 1000 + out_features)
    weight = torch.randn(out_features, in_features, dtype=torch.bfloat16)
    bias = torch.randn(out_features, dtype=torch.bfloat16) if with_bias else None
    x = torch.randn(rows, in_features, dtype=torch.bfloat16)
    packed = cpu_linear.pack_native(weight)
    assert packed.shape == (out_features // 16, in_features // 2, 32)
    assert cpu_linear.linear_for(packed) is cpu_linear.native_linear
    y = cpu_linear.native_linear(x, packed, bias)
    assert y.shape == (rows, out_features) and y.dtype == torch.bfloat16
    # fp32 sums of in_features products, rounded once to bf16 (8 significant bits)
    scale = _exact(x.abs(), weight.abs(), bias.abs() if bias is not None else None).clamp(min=1.0)
    assert ((y.double() - _exact(x, weight, bias)).abs() <= scale * 2.0**-8).all()
    if rows:   # the same sums as oneDNN's up to their order: almost every value identical
        assert (y == F.linear(x, weight, bias)).float().mean() >= 0.995


@needs_native
def test_native_linear_takes_a_strided_view_and_rejects_wrong_inputs() -> None:
    weight = torch.randn(32, 24, dtype=torch.bfloat16)
    packed = cpu_linear.pack_native(weight)
    wide = torch.randn(5, 48, dtype=torch.bfloat16)
    x = wide[:, 8:32]
    expected = cpu_linear.native_linear(x.contiguous(), packed)
    assert torch.equal(cpu_linear.native_linear(x, packed), expected)
    assert torch.equal(cpu_linear.native_linear(x.T.contiguous().T, packed), expected)
    with pytest.raises(ValueError, match=r"bf16 \[rows, 24\]"):
        cpu_linear.native_linear(torch.randn(5, 26, dtype=torch.bfloat16), packed)
    with pytest.raises(ValueError, match=r"bf16 \[rows, 24\]"):
        cpu_linear.native_linear(x.float(), packed)
    with pytest.raises(ValueError, match=r"bias must be bf16 \[32\]"):
        cpu_linear.native_linear(x, packed, torch.randn(16, dtype=torch.bfloat16))


def test_pack_native_refuses_what_the_kernel_cannot_take(monkeypatch) -> None:
    for weight in (torch.zeros(24, 8, dtype=torch.bfloat16),    # out % 16 != 0
                   torch.zeros(16, 7, dtype=torch.bfloat16),    # odd in
                   torch.zeros(16, 8)):                         # fp32
        assert not cpu_linear.can_pack_native(weight)
        with pytest.raises(ValueError, match="cannot pack"):
            cpu_linear.pack_native(weight)
    monkeypatch.setenv("LLMSERVE_CPU_GEMM", "onednn")
    assert not cpu_linear.native_available()
    assert not cpu_linear.can_pack_native(torch.zeros(16, 8, dtype=torch.bfloat16))


needs_quant = pytest.mark.skipif(not (cpu_linear.native_available()
                                      and quant_linear.native_quant.load() is not None),
                                 reason="no AVX512-BF16 build of the C kernels here")


@dataclass
class _Layer:
    input_norm: torch.Tensor
    qkv_proj: object
    qkv_bias: torch.Tensor | None
    o_proj: object
    post_norm: torch.Tensor
    gate_up_proj: object
    down_proj: object


@dataclass
class _Weights:
    layers: list
    lm_head: object


def _mixed_weights(layer_kind: str, head_kind: str | None) -> tuple[_Weights, _Weights]:
    """(fp32 originals, the model's weights): layers quantized as layer_kind (gate_up in groups
    of 64), the LM head as head_kind or bf16 (None)."""
    torch.manual_seed(7)

    def w(out_features, in_features):
        return torch.randn(out_features, in_features) * 0.05

    norm = torch.ones(64, dtype=torch.bfloat16)
    plain = _Weights([_Layer(norm, w(128, 64), None, w(64, 64), norm, w(256, 64), w(64, 128))
                      for _ in range(2)], w(320, 64))
    def q(weight: torch.Tensor, group: int = 32) -> QuantizedWeight:
        return quantize(weight, layer_kind, group)

    layers = [_Layer(norm, q(layer.qkv_proj), None, q(layer.o_proj), norm,
                     q(layer.gate_up_proj, 64), q(layer.down_proj)) for layer in plain.layers]
    head = quantize(plain.lm_head, head_kind) if head_kind else plain.lm_head.bfloat16()
    return plain, _Weights(layers, head)


@needs_quant
@pytest.mark.parametrize("layer_kind, head_kind", [("int4", None), ("int4", "int8"),
                                                   ("int8", "int8")])
def test_prepare_weights_packs_quantized_and_mixed_models(layer_kind, head_kind,
                                                          monkeypatch) -> None:
    monkeypatch.setenv("LLMSERVE_CPU_GEMM", "native")   # no measurement: the VNNI route
    plain, weights = _mixed_weights(layer_kind, head_kind)
    packed = cpu_linear.prepare_weights(weights)
    linear = cpu_linear.model_linear(packed)
    assert linear is cpu_linear._any_linear
    assert cpu_linear.linear_for(packed.layers[0].down_proj) is quant_linear.quant_linear
    layer = packed.layers[0]
    for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
        weight, original = getattr(layer, name), getattr(weights.layers[0], name)
        assert isinstance(weight, quant_linear.PackedQuant) and weight.kind == layer_kind
        assert weight.shape == original.shape and 0 < weight.nbytes <= original.nbytes
        x = torch.randn(5, weight.shape[1], dtype=torch.bfloat16)
        assert torch.equal(linear(x, weight, None), quant_linear.quant_linear(x, weight))
        oracle = quantized_linear(x, original)
        assert ((linear(x, weight, None).float() - oracle.float()).abs()
                <= 0.05 * oracle.float().abs() + 0.05).all()
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    if head_kind is None:   # bf16 LM head: the C bf16 kernel beside the quantized layers
        assert packed.lm_head.dim() == 3
        assert torch.equal(linear(x, packed.lm_head, None),
                           cpu_linear.native_linear(x, packed.lm_head))
    else:
        assert isinstance(packed.lm_head, quant_linear.PackedQuant)
        assert packed.lm_head.kind == head_kind
    assert cpu_linear.describe(packed.lm_head) == (f"{head_kind} g32" if head_kind
                                                   else "bfloat16 C")


def test_quantized_weights_stay_for_the_oracle_without_the_c_library(monkeypatch) -> None:
    monkeypatch.setattr(quant_linear, "can_pack", lambda weight: False)
    monkeypatch.setattr(cpu_linear, "can_pack_native", lambda weight: False)
    _, weights = _mixed_weights("int8", "int8")
    packed = cpu_linear.prepare_weights(weights)
    assert isinstance(packed.layers[0].qkv_proj, QuantizedWeight)
    assert cpu_linear.linear_for(packed.layers[0].qkv_proj) is quantized_linear
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    assert torch.equal(cpu_linear.model_linear(packed)(x, packed.lm_head, None),
                       quantized_linear(x, packed.lm_head))
