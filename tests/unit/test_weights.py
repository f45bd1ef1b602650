"""ModelConfig parsing and load_weights (safetensors fusing, sharding, tying, dummy weights)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine_svc.model_config import ModelConfig
from engine_svc.weights import load_weights

LLAMA_RAW: dict[str, Any] = {
    "model_type": "llama", "vocab_size": 1000, "hidden_size": 256, "intermediate_size": 512,
    "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 4096,
    "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
}
QWEN2_RAW: dict[str, Any] = {
    "model_type": "qwen2", "vocab_size": 1500, "hidden_size": 128, "intermediate_size": 384,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
    "rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "eos_token_id": 7,
    "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
}
MISTRAL_RAW: dict[str, Any] = {
    "model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": None,
    "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
    "sliding_window": None, "bos_token_id": 1, "eos_token_id": 2,
}


def write_config(tmp_path: Path, raw: dict[str, Any], generation: dict[str, Any] | None = None) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    if generation is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    return tmp_path


# ---------------------------------------------------------------- ModelConfig


def test_llama_config_with_generation_eos_list(tmp_path: Path) -> None:
    model_dir = write_config(tmp_path, LLAMA_RAW, {"eos_token_id": [2, 9], "bos_token_id": 1})
    config = ModelConfig.from_dir(model_dir)
    assert (config.model_type, config.num_layers, config.num_heads, config.num_kv_heads) == ("llama", 4, 8, 2)
    assert config.head_dim == 256 // 8
    assert config.eos_token_ids == [2, 9]  # generation_config.json wins over config.json
    assert config.bos_token_id == 1
    assert config.rope_theta == 500000.0
    assert config.rope_scaling is not None and config.rope_scaling["factor"] == 8.0
    assert config.tie_word_embeddings is True and config.attention_bias is False
    assert config.qkv_rows == (8 + 2 * 2) * 32


def test_qwen2_config_has_qkv_bias_and_v5_rope_parameters(tmp_path: Path) -> None:
    config = ModelConfig.from_dir(write_config(tmp_path, QWEN2_RAW))
    assert config.attention_bias is True  # qwen2 has QKV bias although the key is absent
    assert config.rope_theta == 1000000.0 and config.rope_scaling is None
    assert config.eos_token_ids == [7]  # no generation_config.json: from config.json
    assert config.bos_token_id is None
    assert config.tie_word_embeddings is False


def test_mistral_config_null_head_dim(tmp_path: Path) -> None:
    config = ModelConfig.from_dir(write_config(tmp_path, MISTRAL_RAW))
    assert config.head_dim == 128 and config.num_kv_heads == 8
    assert config.max_position_embeddings == 32768


def test_converted_default_model_config(default_model_dir: Path) -> None:
    config = ModelConfig.from_dir(default_model_dir)
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (30, 576, 9, 3)
    assert config.head_dim == 64 and config.tie_word_embeddings and config.eos_token_ids == [2]


@pytest.mark.parametrize("field", ["vocab_size", "hidden_size", "intermediate_size",
                                   "num_hidden_layers", "num_attention_heads", "max_position_embeddings"])
def test_missing_required_field_is_named(tmp_path: Path, field: str) -> None:
    raw = {k: v for k, v in LLAMA_RAW.items() if k != field}
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_dir(write_config(tmp_path, raw))


@pytest.mark.parametrize("change, field", [
    ({"model_type": "gpt2"}, "model_type"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"hidden_size": -4}, "hidden_size"),
    ({"vocab_size": "big"}, "vocab_size"),
    ({"rms_norm_eps": 0}, "rms_norm_eps"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"eos_token_id": "x"}, "eos_token_id"),
])
def test_bad_field_is_named(tmp_path: Path, change: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_dir(write_config(tmp_path, {**LLAMA_RAW, **change}))


def test_missing_config_json(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="config.json"):
        ModelConfig.from_dir(tmp_path)


# ---------------------------------------------------------------- load_weights


def reference_state(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) checkpoint, read with safetensors' own loader."""
    state: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(str(path)))
    return state


def assert_fused_like_hf(model_dir: Path, bias: bool) -> None:
    config = ModelConfig.from_dir(model_dir)
    weights = load_weights(model_dir, config, torch.float32, torch.device("cpu"))
    hf = reference_state(model_dir)
    assert len(weights.layers) == config.num_layers
    torch.testing.assert_close(weights.embed_tokens, hf["model.embed_tokens.weight"], rtol=0, atol=0)
    torch.testing.assert_close(weights.final_norm, hf["model.norm.weight"], rtol=0, atol=0)
    for index, layer in enumerate(weights.layers):
        p = f"model.layers.{index}."
        qkv = torch.cat([hf[p + f"self_attn.{n}_proj.weight"] for n in "qkv"])
        torch.testing.assert_close(layer.qkv_proj, qkv, rtol=0, atol=0)
        assert layer.qkv_proj.shape == (config.qkv_rows, config.hidden_size)
        gate_up = torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]])
        torch.testing.assert_close(layer.gate_up_proj, gate_up, rtol=0, atol=0)
        torch.testing.assert_close(layer.o_proj, hf[p + "self_attn.o_proj.weight"], rtol=0, atol=0)
        torch.testing.assert_close(layer.down_proj, hf[p + "mlp.down_proj.weight"], rtol=0, atol=0)
        torch.testing.assert_close(layer.input_norm, hf[p + "input_layernorm.weight"], rtol=0, atol=0)
        torch.testing.assert_close(layer.post_norm, hf[p + "post_attention_layernorm.weight"], rtol=0, atol=0)
        if bias:
            qkv_bias = torch.cat([hf[p + f"self_attn.{n}_proj.bias"] for n in "qkv"])
            assert layer.qkv_bias is not None
            torch.testing.assert_close(layer.qkv_bias, qkv_bias, rtol=0, atol=0)
        else:
            assert layer.qkv_bias is None
    if config.tie_word_embeddings:
        assert weights.lm_head is weights.embed_tokens
    else:
        torch.testing.assert_close(weights.lm_head, hf["lm_head.weight"], rtol=0, atol=0)


def test_llama_gqa_fused_like_hf(tmp_path: Path, make_tiny_model) -> None:
    assert_fused_like_hf(make_tiny_model(tmp_path, arch="llama", num_kv_heads=2), bias=False)


def test_qwen2_qkv_bias_fused_like_hf(tmp_path: Path, make_tiny_model) -> None:
    assert_fused_like_hf(make_tiny_model(tmp_path, arch="qwen2", num_kv_heads=1, head_dim=32), bias=True)


def test_tied_embeddings_share_one_tensor(tmp_path: Path, make_tiny_model) -> None:
    model_dir = make_tiny_model(tmp_path, arch="llama", tie=True)
    assert "lm_head.weight" not in reference_state(model_dir)
    assert_fused_like_hf(model_dir, bias=False)


def test_sharded_checkpoint_equals_single_file(tmp_path: Path, make_tiny_model) -> None:
    single = make_tiny_model(tmp_path, arch="llama", seed=3, name="single")
    sharded = make_tiny_model(tmp_path, arch="llama", seed=3, name="sharded", max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 1
    assert_fused_like_hf(sharded, bias=False)
    config = ModelConfig.from_dir(single)
    a = load_weights(single, config, torch.float32, torch.device("cpu"))
    b = load_weights(sharded, config, torch.float32, torch.device("cpu"))
    torch.testing.assert_close(a.layers[-1].gate_up_proj, b.layers[-1].gate_up_proj, rtol=0, atol=0)
    torch.testing.assert_close(a.lm_head, b.lm_head, rtol=0, atol=0)


def test_cast_to_bfloat16(tmp_path: Path, make_tiny_model) -> None:
    model_dir = make_tiny_model(tmp_path, arch="qwen2")
    weights = load_weights(model_dir, ModelConfig.from_dir(model_dir), torch.bfloat16, torch.device("cpu"))
    tensors = [weights.embed_tokens, weights.lm_head, weights.final_norm]
    for layer in weights.layers:
        tensors += [layer.qkv_proj, layer.qkv_bias, layer.gate_up_proj, layer.o_proj, layer.down_proj]
    assert all(t is not None and t.dtype == torch.bfloat16 for t in tensors)


def test_missing_tensor_is_named(tmp_path: Path, make_tiny_model) -> None:
    model_dir = make_tiny_model(tmp_path, arch="llama")
    state = load_file(str(model_dir / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_weights(model_dir, ModelConfig.from_dir(model_dir), torch.float32, torch.device("cpu"))


def test_shape_mismatch_with_config_is_named(tmp_path: Path, make_tiny_model) -> None:
    model_dir = make_tiny_model(tmp_path, arch="llama")
    config = ModelConfig.from_dir(model_dir)
    config.intermediate_size *= 2
    with pytest.raises(ValueError, match="gate_proj.weight"):
        load_weights(model_dir, config, torch.float32, torch.device("cpu"))


def test_no_safetensors_files(tmp_path: Path) -> None:
    model_dir = write_config(tmp_path, LLAMA_RAW)
    with pytest.raises(ValueError, match="safetensors"):
        load_weights(model_dir, ModelConfig.from_dir(model_dir), torch.float32, torch.device("cpu"))


def test_unknown_load_format(tmp_path: Path) -> None:
    config = ModelConfig.from_dir(write_config(tmp_path, LLAMA_RAW))
    with pytest.raises(ValueError, match="load_format"):
        load_weights(tmp_path, config, torch.float32, torch.device("cpu"), load_format="pickle")


# ---------------------------------------------------------------- dummy weights


@pytest.mark.parametrize("raw", [LLAMA_RAW, QWEN2_RAW], ids=["llama-tied", "qwen2-untied"])
def test_dummy_weights_shapes_and_values(tmp_path: Path, raw: dict[str, Any]) -> None:
    config = ModelConfig.from_dir(write_config(tmp_path, raw))  # no tensor files at all
    weights = load_weights(tmp_path, config, torch.bfloat16, torch.device("cpu"), load_format="dummy", seed=5)
    hidden, inter = config.hidden_size, config.intermediate_size
    assert weights.embed_tokens.shape == (config.vocab_size, hidden)
    assert weights.lm_head.shape == (config.vocab_size, hidden)
    assert (weights.lm_head is weights.embed_tokens) == config.tie_word_embeddings
    assert len(weights.layers) == config.num_layers
    layer = weights.layers[0]
    assert layer.qkv_proj.shape == (config.qkv_rows, hidden)
    assert layer.o_proj.shape == (hidden, config.num_heads * config.head_dim)
    assert layer.gate_up_proj.shape == (2 * inter, hidden)
    assert layer.down_proj.shape == (hidden, inter)
    assert (layer.qkv_bias is not None) == config.attention_bias
    assert torch.all(layer.input_norm == 1) and torch.all(weights.final_norm == 1)
    assert layer.qkv_proj.dtype == torch.bfloat16
    std = weights.embed_tokens.float().std().item()
    assert 0.015 < std < 0.025
    again = load_weights(tmp_path, config, torch.bfloat16, torch.device("cpu"), load_format="dummy", seed=5)
    assert torch.equal(again.layers[-1].down_proj, weights.layers[-1].down_proj)
    other = load_weights(tmp_path, config, torch.bfloat16, torch.device("cpu"), load_format="dummy", seed=6)
    assert not torch.equal(other.layers[-1].down_proj, weights.layers[-1].down_proj)
