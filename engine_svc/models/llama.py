"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2) written against the token KV pool.

One forward pass takes a flat batch of new tokens: the first `num_decode` requests bring one token
each (decode), the rest bring a run of prompt tokens (prefill, possibly a chunk after a cached
prefix). K/V of the new tokens are stored into their pool rows first; attention then reads every
key and value through the request->token table.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine_svc.forward_batch import ForwardBatch, KVCache
from engine_svc.model_config import ModelConfig
from engine_svc.weights import LayerWeights, ModelWeights
from kernels.backend import KernelOps


class LlamaModel:
    """Stateless forward over `ModelWeights`; kernels come from `ops` (torch or triton)."""

    def __init__(self, config: ModelConfig, weights: ModelWeights, ops: KernelOps,
                 max_positions: int) -> None:
        self.config = config
        # projections packed once where the backend has a faster product for them (bf16 on CPU)
        self.weights = ops.prepare_weights(weights)
        # F.linear, or the product for how prepare_weights packed (or quantized) the projections
        self.linear = ops.model_linear(self.weights)
        self.ops = ops
        device = weights.embed_tokens.device
        # cos_sin: [max_positions, head_dim] float32
        self.cos_sin = ops.build_rope_cache(config.head_dim, max_positions, config.rope_theta,
                                            config.rope_scaling, device)
        self.scale = config.head_dim ** -0.5
        # every layer in one call where the backend has a loop for this model (packed bf16 on
        # CPU: kernels/cpu/csrc/forward_layers.c), else None and _layers runs
        self.native = ops.layer_loop(config, self.weights, self.cos_sin, self.scale)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, cache: KVCache) -> torch.Tensor:
        """Run all layers; returns float32 logits [batch, vocab] at each request's last token."""
        w, ops, eps, linear = self.weights, self.ops, self.config.rms_norm_eps, self.linear
        hidden = F.embedding(batch.input_ids, w.embed_tokens)  # [tokens, hidden]
        if self.native is not None:
            hidden, residual = self.native.run(hidden, batch, cache)
        else:
            hidden, residual = self._layers(hidden, batch, cache)
        last = hidden.index_select(0, batch.logits_index)
        last_residual = residual.index_select(0, batch.logits_index)
        x, _ = ops.rms_norm(last, w.final_norm, eps, last_residual)
        return linear(x, w.lm_head, None).float()  # [batch, vocab]

    def _layers(self, hidden: torch.Tensor, batch: ForwardBatch,
                cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder layers one kernel call at a time: (last output, residual stream).

        kernels/cpu/csrc/forward_layers.c re-encodes this order in C (the CPU layer loop);
        tests/engine/test_native_layers.py holds the two to bit-for-bit equality."""
        w, ops, eps, linear = self.weights, self.ops, self.config.rms_norm_eps, self.linear
        residual: torch.Tensor | None = None
        for index, layer in enumerate(w.layers):
            x, residual = ops.rms_norm(hidden, layer.input_norm, eps, residual)
            hidden = self._attention(layer, x, batch, cache.k[index], cache.v[index],
                                     cache.req_to_token)
            x, residual = ops.rms_norm(hidden, layer.post_norm, eps, residual)
            hidden = linear(ops.silu_and_mul(linear(x, layer.gate_up_proj, None)), layer.down_proj,
                            None)
        assert residual is not None, "a model has at least one layer"
        return hidden, residual

    def _attention(self, layer: LayerWeights, x: torch.Tensor, batch: ForwardBatch,
                   k_cache: torch.Tensor, v_cache: torch.Tensor,
                   req_to_token: torch.Tensor) -> torch.Tensor:
        cfg, ops = self.config, self.ops
        tokens, head_dim = x.shape[0], cfg.head_dim
        q_size, kv_size = cfg.num_heads * head_dim, cfg.num_kv_heads * head_dim
        qkv = self.linear(x, layer.qkv_proj, layer.qkv_bias)  # [tokens, q_size + 2 * kv_size]
        # q, k, v: views of qkv [tokens, heads, head_dim] (rows strided by the fused width)
        q = qkv[:, :q_size].view(tokens, cfg.num_heads, head_dim)
        k = qkv[:, q_size:q_size + kv_size].view(tokens, cfg.num_kv_heads, head_dim)
        v = qkv[:, q_size + kv_size:].view(tokens, cfg.num_kv_heads, head_dim)
        ops.rope_and_store_kv(q, k, v, batch.positions, self.cos_sin, k_cache, v_cache,
                              batch.out_rows)
        nd = batch.num_decode
        parts = []
        if nd > 0:
            parts.append(ops.decode_attention(q[:nd], k_cache, v_cache, req_to_token,
                                              batch.slots[:nd], batch.seq_lens, self.scale,
                                              batch.max_seq_len))
        if nd < tokens:
            parts.append(ops.prefill_attention(q[nd:], k_cache, v_cache, req_to_token,
                                               batch.slots[nd:], batch.prefix_lens,
                                               batch.cu_new_lens, batch.max_new_len, self.scale))
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)  # [tokens, heads, head_dim]
        return self.linear(out.reshape(tokens, q_size), layer.o_proj, None)

