"""Prepacked bf16 projections: oneDNN reordered weights give F.linear's numbers bit for bit;
the C kernel (kernels/cpu/csrc/gemm_bf16.c) gives the exact product within bf16 rounding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.cpu import linear as cpu_linear

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
