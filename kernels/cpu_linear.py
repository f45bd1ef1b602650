"""bf16 matrix products on CPU through oneDNN, with each weight reordered once at load.

`F.linear` on a plain bf16 weight makes oneDNN reorder that weight into its blocked layout on
every call. Reordering once (`torch.ops.mkldnn._reorder_linear_weight`, what inductor's weight
freezing does) gives the same numbers, bit for bit, and measured here (2-core AMD EPYC,
AVX512-BF16, 30 distinct 3072x576 weights): 2.1x faster at 1 row, 1.8x at 32 rows, 1.05x at
2048 rows. fp32 weights gain nothing from it (MKL's sgemm reads them as they are), so they stay.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

# the row count oneDNN tunes the blocked layout for; any row count works with it afterwards
BATCH_HINT = 32

LinearFn = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]


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


def linear_for(weight: Tensor) -> LinearFn:
    """The linear function for weights like this one: packed_linear if it is packed."""
    return packed_linear if weight.is_mkldnn else F.linear
