"""Prepacked oneDNN bf16 projections: the same numbers as F.linear, bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import cpu_linear

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
