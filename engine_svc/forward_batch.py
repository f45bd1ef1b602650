"""What one forward pass reads: the step's index tensors and the KV cache tensors.

Built by the model runner (and the CUDA-graph static batches), read by the model and by the
backends' layer loops (kernels/ reads them by field name: kernels/model_view.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class ForwardBatch:
    """Index tensors of one step, already on the model's device."""

    input_ids: torch.Tensor      # [tokens] int64
    positions: torch.Tensor      # [tokens] int64 absolute position of each token
    out_rows: torch.Tensor       # [tokens] int64 pool row receiving each token's K/V
    slots: torch.Tensor          # [batch] int32 request->token table row per request
    logits_index: torch.Tensor   # [batch] int64 flat index of each request's last new token
    num_decode: int              # requests [0, num_decode) are decode, one token each
    seq_lens: torch.Tensor       # [num_decode] int32 tokens to attend to (current included)
    max_seq_len: int             # max of seq_lens (0 when no decode)
    prefix_lens: torch.Tensor    # [num_prefill] int32 tokens cached before this chunk
    cu_new_lens: torch.Tensor    # [num_prefill + 1] int32 offsets of prefill tokens (from num_decode)
    max_new_len: int             # longest prefill chunk (0 when no prefill)


@dataclass(slots=True)
class KVCache:
    """Per-layer K and V pool tensors plus the request->token table."""

    k: list[torch.Tensor]        # per layer [capacity, kv_heads, head_dim]
    v: list[torch.Tensor]        # per layer [capacity, kv_heads, head_dim]
    req_to_token: torch.Tensor   # [max_requests, max_model_len] int32
