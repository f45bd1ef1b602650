"""Weights of a Llama-family HF directory (Llama, SmolLM2, Mistral, Qwen2).

Given the directory's ModelConfig (engine_svc/model_config.py), `load_weights` reads the
safetensors files tensor by tensor, fuses Q/K/V and gate/up, and casts to the engine's dtype on its
device. `load_format="dummy"` builds random weights for any config without reading tensor files.

Quantization (`--quantization`): int8 / int4 quantize every projection per group as it is read
(from its float32 values on the CPU, then moved to the device: never the whole model in float32)
and the LM head to int8; `gguf` reads the directory's `model.gguf` (engine_svc/gguf_weights.py),
its Q8_0 / Q4_0 / Q4_1 tensors kept as they are. Embeddings stay in the engine dtype either way
(decode only gathers rows of them); with tied embeddings a quantized LM head is its own copy.
"""
from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from engine_svc.gguf_weights import GgufTensorSource, gguf_file
from engine_svc.model_config import ModelConfig, read_json_object
from kernels.quant import QUANT_KINDS, QuantizedWeight, dequantize, quantize

log = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "safetensors", "dummy")
DUMMY_STD = 0.02
HEAD_KIND = "int8"   # the LM head under --quantization int8 and int4

Weight = Tensor | QuantizedWeight   # a projection: plain [out, in] or weight-only quantized


@dataclass(slots=True)
class LayerWeights:
    """One decoder layer, with QKV and gate/up fused (projections plain or QuantizedWeight)."""

    input_norm: Tensor  # [hidden]
    qkv_proj: Weight  # [(q_heads + 2*kv_heads) * head_dim, hidden]  (q rows, then k, then v)
    qkv_bias: Tensor | None  # [(q_heads + 2*kv_heads) * head_dim]
    o_proj: Weight  # [hidden, q_heads*head_dim]
    post_norm: Tensor  # [hidden]
    gate_up_proj: Weight  # [2*intermediate, hidden] (gate rows first)
    down_proj: Weight  # [hidden, intermediate]


@dataclass(slots=True)
class ModelWeights:
    """All weights of a Llama-family model, on one device; plain tensors in the engine dtype."""

    embed_tokens: Tensor  # [vocab, hidden] (always plain: decode only gathers rows of it)
    layers: list[LayerWeights]
    final_norm: Tensor  # [hidden]
    lm_head: Weight  # [vocab, hidden] (the same tensor as embed_tokens when tied and plain)


def dense_weight_bytes(config: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes the model's weights take unquantized in `dtype` (a tied LM head counted once)."""
    hidden, inter = config.hidden_size, config.intermediate_size
    per_layer = (2 * hidden + config.qkv_rows * hidden + hidden * config.num_heads * config.head_dim
                 + 3 * inter * hidden + (config.qkv_rows if config.attention_bias else 0))
    heads = 1 if config.tie_word_embeddings else 2
    elements = config.num_layers * per_layer + heads * config.vocab_size * hidden + hidden
    return elements * dtype.itemsize


# ---------------------------------------------------------------- quantized projections


def quantize_named(weight: Tensor, kind: str, group_size: int, name: str) -> QuantizedWeight:
    """`weight` [out, in] quantized from its float32 values; ValueError naming the tensor when
    `in` does not split into groups."""
    in_features = weight.shape[1]
    if in_features % group_size:
        raise ValueError(f"--quantization {kind}: tensor {name!r} has in_features={in_features}, "
                         f"not a multiple of --quantization-group-size {group_size}")
    return quantize(weight.float(), kind, group_size)


def cat_rows(parts: list[Weight], dtype: torch.dtype) -> Weight:
    """Fuse projections along rows: plain tensors with torch.cat, QuantizedWeights of one kind
    and group by their fields (groups run along `in`, so rows fuse as they are); a mix is
    dequantized to `dtype` (logged: it costs the quantized product for that projection)."""
    if all(isinstance(p, Tensor) for p in parts):
        return torch.cat(parts)  # type: ignore[arg-type]
    quantized = [p for p in parts if isinstance(p, QuantizedWeight)]
    first = quantized[0]
    if len(quantized) == len(parts) and all(
            (p.kind, p.group_size) == (first.kind, first.group_size) for p in quantized):
        offsets = None if first.offsets is None else torch.cat([p.offsets for p in quantized])
        return QuantizedWeight(first.kind, torch.cat([p.qweight for p in quantized]),
                               torch.cat([p.scales for p in quantized]), offsets, first.group_size)
    log.warning("projections of mixed formats (%s) fused in %s: that projection runs unquantized",
                ", ".join(p.kind if isinstance(p, QuantizedWeight) else str(p.dtype)
                          for p in parts), dtype)
    return torch.cat([dequantize(p, dtype) if isinstance(p, QuantizedWeight) else p.to(dtype)
                      for p in parts])


# ---------------------------------------------------------------- safetensors


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint files: via the shard index json, else model.safetensors, else any *.safetensors."""
    index_path = model_dir / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map = read_json_object(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path.name}: weight_map is missing or empty")
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
    elif (model_dir / "model.safetensors").is_file():
        files = [model_dir / "model.safetensors"]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model_dir {model_dir}: no *.safetensors files found")
    for path in files:
        if not path.is_file():
            raise ValueError(f"model_dir {model_dir}: shard {path.name} listed in the index is missing")
    return files


class _TensorReader:
    """Reads single tensors by HF name from a set of open safetensors files: plain ones cast to
    dtype/device; with `quantize_kind`, projections quantized per tensor as read (from float32 on
    the CPU, then moved) and the LM head as int8."""

    def __init__(self, handles: list[Any], dtype: torch.dtype, device: torch.device,
                 quantize_kind: str | None = None, group_size: int = 32) -> None:
        self._where: dict[str, Any] = {}
        for handle in handles:
            for name in handle.keys():
                self._where[name] = handle
        self._dtype = dtype
        self._device = device
        self._kind, self._group = quantize_kind, group_size
        # checkpoints saved from the bare LlamaModel have no "model." prefix
        self._prefix = "" if any(n.startswith("model.") for n in self._where) else "model."

    def has(self, name: str) -> bool:
        return self._key(name) in self._where

    def _key(self, name: str) -> str:
        return name[len("model."):] if self._prefix and name.startswith("model.") else name

    def _read(self, name: str, shape: tuple[int, ...]) -> Tensor:
        """The tensor as stored, on the CPU."""
        key = self._key(name)
        handle = self._where.get(key)
        if handle is None:
            raise ValueError(f"checkpoint: tensor {name!r} is missing")
        tensor = handle.get_tensor(key)
        if tuple(tensor.shape) != shape:
            raise ValueError(f"checkpoint: tensor {name!r} has shape {tuple(tensor.shape)}, "
                             f"expected {shape} from config.json")
        return tensor

    def get(self, name: str, shape: tuple[int, ...]) -> Tensor:
        """A plain tensor in the engine dtype on the device."""
        return self._read(name, shape).to(device=self._device, dtype=self._dtype)

    def projection(self, name: str, shape: tuple[int, int]) -> Weight:
        """A projection: plain, or quantized as `quantize_kind` per group."""
        if self._kind is None:
            return self.get(name, shape)
        weight = quantize_named(self._read(name, shape), self._kind, self._group, name)
        return weight.to(self._device)

    def head(self, name: str, shape: tuple[int, int], plain: Tensor | None = None) -> Weight:
        """The LM head: `plain` (the tied embedding table) or the tensor unquantized; int8 per
        group when quantizing (llama.cpp too keeps the output tensor at higher precision)."""
        if self._kind is None:
            return plain if plain is not None else self.get(name, shape)
        weight = quantize_named(self._read(name, shape), HEAD_KIND, self._group, name)
        return weight.to(self._device)


class TensorSource(Protocol):
    """Where a model's tensors come from (safetensors, or a GGUF: engine_svc/gguf_weights.py)."""

    def has(self, name: str) -> bool: ...
    def get(self, name: str, shape: tuple[int, ...]) -> Tensor: ...
    def projection(self, name: str, shape: tuple[int, int]) -> Weight: ...
    def head(self, name: str, shape: tuple[int, int], plain: Tensor | None = None) -> Weight: ...


def _load_layer(reader: TensorSource, config: ModelConfig, index: int,
                dtype: torch.dtype) -> LayerWeights:
    prefix = f"model.layers.{index}."
    hidden, inter, head_dim = config.hidden_size, config.intermediate_size, config.head_dim
    q_rows, kv_rows = config.num_heads * head_dim, config.num_kv_heads * head_dim
    attn = prefix + "self_attn."
    if reader.has(attn + "o_proj.bias"):
        raise ValueError(f"checkpoint: {attn}o_proj.bias present; an o_proj bias is not supported")
    qkv_proj = cat_rows([
        reader.projection(attn + "q_proj.weight", (q_rows, hidden)),
        reader.projection(attn + "k_proj.weight", (kv_rows, hidden)),
        reader.projection(attn + "v_proj.weight", (kv_rows, hidden)),
    ], dtype)  # [(q_heads + 2*kv_heads) * head_dim, hidden]
    qkv_bias = None
    if config.attention_bias:
        qkv_bias = torch.cat([
            reader.get(attn + "q_proj.bias", (q_rows,)),
            reader.get(attn + "k_proj.bias", (kv_rows,)),
            reader.get(attn + "v_proj.bias", (kv_rows,)),
        ])  # [(q_heads + 2*kv_heads) * head_dim]
    gate_up_proj = cat_rows([
        reader.projection(prefix + "mlp.gate_proj.weight", (inter, hidden)),
        reader.projection(prefix + "mlp.up_proj.weight", (inter, hidden)),
    ], dtype)  # [2*intermediate, hidden]
    return LayerWeights(
        input_norm=reader.get(prefix + "input_layernorm.weight", (hidden,)),
        qkv_proj=qkv_proj,
        qkv_bias=qkv_bias,
        o_proj=reader.projection(attn + "o_proj.weight", (hidden, q_rows)),
        post_norm=reader.get(prefix + "post_attention_layernorm.weight", (hidden,)),
        gate_up_proj=gate_up_proj,
        down_proj=reader.projection(prefix + "mlp.down_proj.weight", (hidden, inter)),
    )


def _load_model(reader: TensorSource, config: ModelConfig, dtype: torch.dtype) -> ModelWeights:
    vocab_shape = (config.vocab_size, config.hidden_size)
    embed_tokens = reader.get("model.embed_tokens.weight", vocab_shape)
    layers = [_load_layer(reader, config, index, dtype) for index in range(config.num_layers)]
    final_norm = reader.get("model.norm.weight", (config.hidden_size,))
    if config.tie_word_embeddings:
        lm_head = reader.head("model.embed_tokens.weight", vocab_shape, plain=embed_tokens)
    else:
        lm_head = reader.head("lm_head.weight", vocab_shape)
    return ModelWeights(embed_tokens=embed_tokens, layers=layers, final_norm=final_norm,
                        lm_head=lm_head)


def _load_safetensors(model_dir: Path, config: ModelConfig, dtype: torch.dtype,
                      device: torch.device, quantize_kind: str | None,
                      group_size: int) -> ModelWeights:
    from safetensors import safe_open

    files = safetensors_files(model_dir)
    with ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
                   for path in files]
        reader = _TensorReader(handles, dtype, device, quantize_kind, group_size)
        return _load_model(reader, config, dtype)


# ---------------------------------------------------------------- dummy weights


def _dummy_weights(config: ModelConfig, dtype: torch.dtype, device: torch.device, seed: int,
                   quantize_kind: str | None, group_size: int) -> ModelWeights:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)

    def normal(*shape: int) -> Tensor:
        return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, DUMMY_STD, generator=generator)

    def project(name: str, *shape: int, kind: str | None = quantize_kind) -> Weight:
        weight = normal(*shape)   # quantized one tensor at a time: never the whole model plain
        return weight if kind is None else quantize_named(weight, kind, group_size, name)

    def ones(size: int) -> Tensor:
        return torch.ones(size, dtype=dtype, device=device)

    hidden, inter = config.hidden_size, config.intermediate_size
    layers = [
        LayerWeights(
            input_norm=ones(hidden),
            qkv_proj=project(f"layers.{i}.qkv_proj", config.qkv_rows, hidden),
            qkv_bias=normal(config.qkv_rows) if config.attention_bias else None,
            o_proj=project(f"layers.{i}.o_proj", hidden, config.num_heads * config.head_dim),
            post_norm=ones(hidden),
            gate_up_proj=project(f"layers.{i}.gate_up_proj", 2 * inter, hidden),
            down_proj=project(f"layers.{i}.down_proj", hidden, inter),
        )
        for i in range(config.num_layers)
    ]
    embed_tokens = normal(config.vocab_size, hidden)
    head_kind = None if quantize_kind is None else HEAD_KIND
    if config.tie_word_embeddings:
        lm_head: Weight = embed_tokens if head_kind is None else quantize_named(
            embed_tokens, head_kind, group_size, "lm_head")
    else:
        lm_head = project("lm_head", config.vocab_size, hidden, kind=head_kind)
    return ModelWeights(embed_tokens=embed_tokens, layers=layers, final_norm=ones(hidden), lm_head=lm_head)


def load_weights(model_dir: str | Path, config: ModelConfig, dtype: torch.dtype, device: torch.device,
                 load_format: str = "auto", seed: int = 0, quantization: str = "none",
                 group_size: int = 32) -> ModelWeights:
    """Load (or, for load_format="dummy", randomly build) the fused weights on `device`.

    quantization: "none" (everything in `dtype`), "int8" / "int4" (projections quantized per
    group of `group_size` as each is read, the LM head int8, embeddings and norms in `dtype`),
    "gguf" (the model's GGUF tensors as stored: engine_svc/gguf_weights.py).
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {load_format!r}")
    if quantization not in ("none", "gguf", *QUANT_KINDS):
        raise ValueError(f"quantization must be none, gguf, {' or '.join(QUANT_KINDS)}; "
                         f"got {quantization!r}")
    device = torch.device(device)
    kind = quantization if quantization in QUANT_KINDS else None
    if quantization == "gguf":
        if load_format == "dummy":
            raise ValueError("--quantization gguf cannot be combined with --load-format dummy")
        source = GgufTensorSource(gguf_file(model_dir), config, dtype, device)
        return _load_model(source, config, dtype)
    if load_format == "dummy":
        return _dummy_weights(config, dtype, device, seed, kind, group_size)
    return _load_safetensors(Path(model_dir), config, dtype, device, kind, group_size)
