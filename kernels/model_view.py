"""What the backends' model-level extras read of the model they serve, as structural types.

engine_svc's ModelConfig (engine_svc/model_config.py), ModelWeights (engine_svc/weights.py),
ForwardBatch and KVCache (engine_svc/forward_batch.py) fit these by field name, so kernels/
imports nothing from engine_svc and the import graph keeps one direction
(tests/unit/test_import_graph.py).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Callable, Protocol

from torch import Tensor

# a projection: (x [rows, in], weight as its backend packed it, bias [out] or None) -> [rows, out]
LinearFn = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]


class ModelConfigView(Protocol):
    """The sizes of a Llama-family decoder."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float


class LayerWeightsView(Protocol):
    """One decoder layer's tensors (projections plain [out, in] or packed by a backend)."""

    input_norm: Tensor
    qkv_proj: Tensor
    qkv_bias: Tensor | None
    o_proj: Tensor
    post_norm: Tensor
    gate_up_proj: Tensor
    down_proj: Tensor


class ModelWeightsView(Protocol):
    """The decoder layers and the LM head."""

    layers: Sequence[LayerWeightsView]
    lm_head: Tensor


class StepBatchView(Protocol):
    """One step's index tensors (decode requests first, then prefill chunks)."""

    positions: Tensor     # [tokens] absolute position of each token
    out_rows: Tensor      # [tokens] pool row receiving each token's K/V
    slots: Tensor         # [batch] request->token table row per request
    num_decode: int       # requests [0, num_decode) bring one token each
    seq_lens: Tensor      # [num_decode] keys each decode token sees
    prefix_lens: Tensor   # [num_prefill] tokens cached before each chunk
    cu_new_lens: Tensor   # [num_prefill + 1] offsets of the chunks' tokens


class KVCacheView(Protocol):
    """Per-layer K and V pools plus the request->token table."""

    k: list[Tensor]        # per layer [capacity, kv_heads, head_dim]
    v: list[Tensor]        # per layer [capacity, kv_heads, head_dim]
    req_to_token: Tensor   # [max_requests, max_model_len] int32


class LayerLoop(Protocol):
    """Every decoder layer in one call: what the model's Python layer loop computes."""

    def run(self, hidden: Tensor, batch: StepBatchView,
            cache: KVCacheView) -> tuple[Tensor, Tensor]:
        """hidden [tokens, hidden] embeddings -> (last layer's output, residual stream)."""
        ...
