"""A Llama-family model's hyper-parameters, read from its HF `config.json` (+ `generation_config.json`).

Supported model types: Llama, SmolLM2 (llama), Mistral, Qwen2. `ModelConfig.from_dir` raises a
ValueError naming the missing or unsupported field; engine_svc/weights.py loads the tensors it
describes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; ValueError naming the file if it is not valid JSON or not an object."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path.name}: not valid JSON ({exc})") from exc
    if not isinstance(payload, dict):
        raise ValueError(f"{path.name}: expected a JSON object")
    return payload



def write_json_object(path: Path, payload: dict[str, Any]) -> None:
    """Write `payload` as the converter writes config.json (indent 2, UTF-8, final newline)."""
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

def _int_field(raw: dict[str, Any], key: str, default: int | None = None, minimum: int = 1) -> int:
    value = raw.get(key)
    if value is None:  # absent or null: the default, if there is one
        value = default
    if value is None:
        raise ValueError(f"config.json: required field {key!r} is missing")
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"config.json: {key} must be an integer >= {minimum}, got {value!r}")
    return value


def _float_field(raw: dict[str, Any], key: str, default: float) -> float:
    value = raw.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"config.json: {key} must be a positive number, got {value!r}")
    return float(value)


def _token_ids(value: Any, key: str) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"{key} must be a non-negative int or a list of them, got {value!r}")
    return list(values)


def _rope(raw: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling or None) from the legacy keys or transformers v5 `rope_parameters`."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        theta = _float_field(params, "rope_theta", 10000.0)
        kind = params.get("rope_type", params.get("type", "default"))
        scaling = None if kind == "default" else {k: v for k, v in params.items() if k != "rope_theta"}
        return theta, scaling
    theta = _float_field(raw, "rope_theta", 10000.0)
    scaling = raw.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise ValueError(f"config.json: rope_scaling must be an object or null, got {scaling!r}")
    if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    return theta, scaling or None


@dataclass(slots=True)
class ModelConfig:
    """The subset of a HF config.json the engine needs."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # Qwen2-style QKV bias (true for qwen2 even if config lacks the key)
    eos_token_ids: list[int]  # from generation_config.json if present, else config.json
    bos_token_id: int | None

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        """Read `config.json` (+ `generation_config.json`); ValueError naming a missing/unsupported field."""
        model_dir = Path(model_dir)
        config_path = model_dir / "config.json"
        if not config_path.is_file():
            raise ValueError(f"model_dir {model_dir}: config.json not found")
        raw = read_json_object(config_path)
        gen_path = model_dir / "generation_config.json"
        generation = read_json_object(gen_path) if gen_path.is_file() else {}
        return cls.from_dict(raw, generation)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], generation: dict[str, Any] | None = None) -> "ModelConfig":
        """Build from parsed config.json (and generation_config.json) contents."""
        generation = generation or {}
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"config.json: model_type {model_type!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        if raw.get("mlp_bias"):
            raise ValueError("config.json: mlp_bias=true is not supported")
        hidden = _int_field(raw, "hidden_size")
        num_heads = _int_field(raw, "num_attention_heads")
        num_kv_heads = _int_field(raw, "num_key_value_heads", num_heads)
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"config.json: num_attention_heads={num_heads} must be a multiple of "
                             f"num_key_value_heads={num_kv_heads}")
        if raw.get("head_dim") is None and hidden % num_heads != 0:
            raise ValueError(f"config.json: hidden_size={hidden} is not divisible by "
                             f"num_attention_heads={num_heads} and head_dim is missing")
        head_dim = _int_field(raw, "head_dim", hidden // num_heads)
        if model_type == "qwen2":
            attention_bias = True
        else:
            attention_bias = bool(raw.get("attention_bias", False))
            if attention_bias:  # Llama's attention_bias also adds an o_proj bias
                raise ValueError(f"config.json: attention_bias=true is not supported for {model_type}")
        rope_theta, rope_scaling = _rope(raw)
        eos_source = generation if generation.get("eos_token_id") is not None else raw
        bos = generation.get("bos_token_id", raw.get("bos_token_id"))
        bos_ids = _token_ids(bos, "bos_token_id")
        return cls(
            model_type=model_type,
            vocab_size=_int_field(raw, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_int_field(raw, "intermediate_size"),
            num_layers=_int_field(raw, "num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=_float_field(raw, "rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=_int_field(raw, "max_position_embeddings"),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            eos_token_ids=_token_ids(eos_source.get("eos_token_id"), "eos_token_id"),
            bos_token_id=bos_ids[0] if bos_ids else None,
        )

    @property
    def qkv_rows(self) -> int:
        """Rows of the fused QKV projection: (q_heads + 2*kv_heads) * head_dim."""
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
