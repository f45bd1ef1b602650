"""What the GGUF -> HF conversion reads of a GGUF's metadata, and the conversion's error type.

Shared by the conversion driver (engine_svc/convert_gguf.py), its tokenizer builder
(engine_svc/gguf_tokenizer.py) and the GGUF weight loader (engine_svc/gguf_weights.py); the
readers are either `gguf.GGUFReader` or engine_svc/gguf_file.py's MetadataView.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class ConversionError(Exception):
    """A conversion failure with a one-line, user-facing message."""


@dataclass(slots=True)
class GgufHyperParams:
    """Llama hyper-parameters read from the GGUF metadata."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    context_length: int


def metadata_field(reader: Any, key: str, default: Any = None) -> Any:
    """The value of metadata `key` (gguf.GGUFReader or gguf_file.MetadataView), else `default`;
    ConversionError naming the key when it is missing and there is no default."""
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise ConversionError(f"malformed GGUF: metadata key {key!r} is missing")
        return default
    return field.contents()


def read_hyper_params(reader: Any) -> GgufHyperParams:
    """Llama hyper-parameters from the GGUF metadata; ConversionError if it is not a llama model."""
    arch = metadata_field(reader, "general.architecture")
    if arch != "llama":
        raise ConversionError(f"unsupported GGUF architecture {arch!r} (only 'llama')")
    hidden = int(metadata_field(reader, "llama.embedding_length"))
    num_heads = int(metadata_field(reader, "llama.attention.head_count"))
    eps = float(metadata_field(reader, "llama.attention.layer_norm_rms_epsilon"))
    return GgufHyperParams(
        num_layers=int(metadata_field(reader, "llama.block_count")),
        hidden_size=hidden,
        intermediate_size=int(metadata_field(reader, "llama.feed_forward_length")),
        num_heads=num_heads,
        num_kv_heads=int(metadata_field(reader, "llama.attention.head_count_kv", num_heads)),
        head_dim=int(metadata_field(reader, "llama.rope.dimension_count", hidden // num_heads)),
        rope_theta=float(metadata_field(reader, "llama.rope.freq_base", 10000.0)),
        rms_norm_eps=float(f"{eps:.6g}"),  # undo the float32 round trip: 9.9999997e-06 -> 1e-05
        context_length=int(metadata_field(reader, "llama.context_length")),
    )
