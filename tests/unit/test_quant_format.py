"""kernels/quant.py: the quantized-weight format and its torch oracle."""
from __future__ import annotations

import pytest
import torch

from kernels import quant


@pytest.mark.parametrize("kind", ["int8", "int4", "int4 symmetric"])
@pytest.mark.parametrize("group_size", quant.GROUP_SIZES)
def test_round_trip_error_is_at_most_half_a_step(kind: str, group_size: int) -> None:
    torch.manual_seed(0)
    weight = torch.randn(48, 3 * group_size) * torch.rand(48, 1) * 4   # rows of varied range
    weight[5] = 0.0                                                   # an all-zero row
    if kind == "int4 symmetric":
        packed = quant.quantize_int4(weight, group_size, symmetric=True)
        assert torch.equal(packed.offsets, -8 * packed.scales)
    else:
        packed = quant.quantize(weight, kind, group_size)
    quant.check(packed)
    assert packed.shape == (48, 3 * group_size)
    restored = quant.dequantize(packed)
    step = packed.scales.repeat_interleave(group_size, dim=1)          # [out, in]
    assert torch.all((restored - weight).abs() <= step / 2 + 1e-6)
    assert torch.all(restored[5] == 0)
    # the extreme of every group is exact
    groups = weight.reshape(48, 3, group_size)
    where = groups.abs().argmax(dim=2, keepdim=True)
    extremes = groups.gather(2, where)
    restored_extremes = restored.reshape(48, 3, group_size).gather(2, where)
    # int8: +-max -> +-127 steps; int4: min -> level 0, max -> 15; symmetric int4: +-max -> +-7
    assert (restored_extremes - extremes).abs().max() < 1e-5
    if kind == "int4":   # asymmetric: the minimum is exact too
        assert (restored.reshape(48, 3, -1).amin(2) - groups.amin(2)).abs().max() < 1e-5


def test_int4_nibbles_hold_even_elements_low_and_odd_high() -> None:
    levels = torch.tensor([[1, 2, 3, 4, 15, 0]], dtype=torch.uint8)
    packed = quant.pack_int4(levels)
    assert packed.tolist() == [[0x21, 0x43, 0x0F]]
    assert torch.equal(quant.unpack_int4(packed), levels)


def test_dequantize_applies_scale_and_offset_per_group() -> None:
    # a GGUF Q4_1-like weight: w = d * q + m with a different (d, m) per group
    levels = torch.arange(64, dtype=torch.uint8).remainder(16).reshape(1, 64)
    scales = torch.tensor([[0.5, 2.0]])
    offsets = torch.tensor([[-1.0, 3.0]])
    weight = quant.QuantizedWeight("int4", quant.pack_int4(levels), scales, offsets, 32)
    quant.check(weight)
    expected = torch.cat([levels[0, :32].float() * 0.5 - 1.0, levels[0, 32:].float() * 2.0 + 3.0])
    assert torch.equal(quant.dequantize(weight)[0], expected)
    assert weight.nbytes == 32 + 4 * 2 + 4 * 2


def test_quantized_linear_is_x_times_the_dequantized_weight() -> None:
    torch.manual_seed(1)
    weight = quant.quantize(torch.randn(24, 64), "int4", 32)
    x = torch.randn(5, 64)
    bias = torch.randn(24)
    expected = x @ quant.dequantize(weight).t() + bias
    torch.testing.assert_close(quant.quantized_linear(x, weight, bias), expected)
    assert quant.quantized_linear(x.bfloat16(), weight).dtype == torch.bfloat16


def test_bad_inputs_name_the_field() -> None:
    with pytest.raises(ValueError, match="group_size"):
        quant.quantize(torch.randn(4, 64), "int8", 16)
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        quant.quantize(torch.randn(4, 48), "int8", 32)
    with pytest.raises(ValueError, match="kind"):
        quant.quantize(torch.randn(4, 64), "int2", 32)
    good = quant.quantize(torch.randn(4, 64), "int4", 32)
    with pytest.raises(ValueError, match="offsets"):
        quant.check(quant.QuantizedWeight("int4", good.qweight, good.scales, None, 32))
    with pytest.raises(ValueError, match="qweight"):
        quant.check(quant.QuantizedWeight("int8", good.qweight, good.scales, None, 32))
    with pytest.raises(ValueError, match="scales"):
        quant.check(quant.QuantizedWeight("int4", good.qweight, good.scales.half(), good.offsets,
                                          32))
