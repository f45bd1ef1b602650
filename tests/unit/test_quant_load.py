"""--quantization int8|int4 at load (engine_svc/weights.py): every projection of an HF checkpoint
becomes a QuantizedWeight of the asked kind and group, the LM head int8, embeddings and norms
stay plain in the engine dtype; the values are the checkpoint's within half a quantization step."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine_svc.config import EngineConfig
from engine_svc.model_runner import weight_bytes
from engine_svc.model_config import ModelConfig
from engine_svc.weights import dense_weight_bytes, load_weights
from kernels.quant import QuantizedWeight, check, dequantize

CPU = torch.device("cpu")
PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def checkpoint(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def assert_within_half_step(weight: QuantizedWeight, original: torch.Tensor) -> None:
    """|dequantize - original| <= scale / 2 per group (plus float32 rounding)."""
    check(weight)
    out_features, in_features = weight.shape
    error = (dequantize(weight) - original.float()).abs()
    step = weight.scales.repeat_interleave(weight.group_size, dim=1)   # [out, in]
    assert bool((error <= step / 2 * (1 + 1e-5) + 1e-7).all())
    assert not torch.equal(dequantize(weight), original.float())      # really quantized


@pytest.mark.parametrize("kind, group", [("int8", 32), ("int4", 32), ("int4", 64), ("int8", 64)])
def test_projections_quantized_as_asked(tmp_path: Path, make_tiny_model, kind: str,
                                        group: int) -> None:
    model_dir = make_tiny_model(tmp_path, tie=False)
    config = ModelConfig.from_dir(model_dir)
    weights = load_weights(model_dir, config, torch.bfloat16, CPU, quantization=kind,
                           group_size=group)
    state = checkpoint(model_dir)
    for index, layer in enumerate(weights.layers):
        prefix = f"model.layers.{index}."
        originals = {
            "qkv_proj": torch.cat([state[f"{prefix}self_attn.{n}_proj.weight"] for n in "qkv"]),
            "o_proj": state[f"{prefix}self_attn.o_proj.weight"],
            "gate_up_proj": torch.cat([state[f"{prefix}mlp.{n}_proj.weight"]
                                       for n in ("gate", "up")]),
            "down_proj": state[f"{prefix}mlp.down_proj.weight"]}
        for name in PROJECTIONS:
            weight = getattr(layer, name)
            assert isinstance(weight, QuantizedWeight), name
            assert (weight.kind, weight.group_size) == (kind, group)
            assert_within_half_step(weight, originals[name])
        assert layer.input_norm.dtype == torch.bfloat16
        assert torch.equal(layer.input_norm, state[f"{prefix}input_layernorm.weight"].bfloat16())
    assert isinstance(weights.lm_head, QuantizedWeight) and weights.lm_head.kind == "int8"
    assert weights.lm_head.group_size == group
    assert_within_half_step(weights.lm_head, state["lm_head.weight"])
    assert torch.equal(weights.embed_tokens, state["model.embed_tokens.weight"].bfloat16())


def test_tied_embeddings_stay_plain_and_lm_head_gets_an_int8_copy(tmp_path: Path,
                                                                  make_tiny_model) -> None:
    model_dir = make_tiny_model(tmp_path, tie=True)
    weights = load_weights(model_dir, ModelConfig.from_dir(model_dir), torch.bfloat16, CPU,
                           quantization="int4")
    embed = checkpoint(model_dir)["model.embed_tokens.weight"]
    assert isinstance(weights.embed_tokens, torch.Tensor)
    assert torch.equal(weights.embed_tokens, embed.bfloat16())
    assert isinstance(weights.lm_head, QuantizedWeight) and weights.lm_head.kind == "int8"
    assert_within_half_step(weights.lm_head, embed)


def test_qwen2_bias_stays_plain(tmp_path: Path, make_tiny_model) -> None:
    model_dir = make_tiny_model(tmp_path, arch="qwen2")
    weights = load_weights(model_dir, ModelConfig.from_dir(model_dir), torch.float32, CPU,
                           quantization="int8")
    layer = weights.layers[0]
    assert isinstance(layer.qkv_proj, QuantizedWeight)
    assert layer.qkv_bias is not None and layer.qkv_bias.dtype == torch.float32


LLAMA_RAW = {"model_type": "llama", "vocab_size": 128, "hidden_size": 64,
             "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 256, "tie_word_embeddings": True}


def config_only(tmp_path: Path, **change: object) -> ModelConfig:
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA_RAW, **change}))
    return ModelConfig.from_dir(tmp_path)


def write_random_checkpoint(model_dir: Path, config: ModelConfig) -> None:
    """model.safetensors with every tensor `config` needs (HF names), random float32."""
    from safetensors.torch import save_file

    hidden, inter, kv_rows = config.hidden_size, config.intermediate_size, \
        config.num_kv_heads * config.head_dim
    shapes = {"model.embed_tokens.weight": (config.vocab_size, hidden),
              "model.norm.weight": (hidden,)}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (hidden, hidden),
                       p + "self_attn.k_proj.weight": (kv_rows, hidden),
                       p + "self_attn.v_proj.weight": (kv_rows, hidden),
                       p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "mlp.gate_proj.weight": (inter, hidden),
                       p + "mlp.up_proj.weight": (inter, hidden),
                       p + "mlp.down_proj.weight": (hidden, inter),
                       p + "input_layernorm.weight": (hidden,),
                       p + "post_attention_layernorm.weight": (hidden,)})
    save_file({name: torch.randn(shape) for name, shape in shapes.items()},
              str(model_dir / "model.safetensors"))


def test_group_that_does_not_divide_in_features_names_the_tensor(tmp_path: Path) -> None:
    config = config_only(tmp_path)   # intermediate 96: down_proj's in_features % 64 != 0
    write_random_checkpoint(tmp_path, config)
    with pytest.raises(ValueError, match=r"int4: tensor 'model\.layers\.0\.mlp\.down_proj\.weight' "
                                         r"has in_features=96.*group-size 64"):
        load_weights(tmp_path, config, torch.float32, CPU, quantization="int4", group_size=64)
    with pytest.raises(ValueError, match=r"down_proj' has in_features=96"):
        load_weights(tmp_path, config, torch.float32, CPU, load_format="dummy",
                     quantization="int8", group_size=64)
    weights = load_weights(tmp_path, config, torch.float32, CPU, quantization="int4",
                           group_size=32)   # 96 = 3 groups of 32
    assert weights.layers[0].down_proj.shape == (64, 96)


def test_dummy_weights_quantize(tmp_path: Path) -> None:
    config = config_only(tmp_path)
    weights = load_weights(tmp_path, config, torch.bfloat16, CPU, load_format="dummy",
                           quantization="int8")
    for layer in weights.layers:
        for name in PROJECTIONS:
            check(getattr(layer, name))
            assert getattr(layer, name).kind == "int8"
    assert weights.lm_head.kind == "int8" and weights.embed_tokens.dtype == torch.bfloat16


@pytest.mark.parametrize("tie", [True, False])
def test_dense_weight_bytes_is_what_unquantized_weights_take(tmp_path: Path, tie: bool) -> None:
    config = config_only(tmp_path, tie_word_embeddings=tie)
    for dtype in (torch.float32, torch.bfloat16):
        weights = load_weights(tmp_path, config, dtype, CPU, load_format="dummy")
        assert weight_bytes(weights) == dense_weight_bytes(config, dtype)


def test_quantized_weights_take_fewer_bytes(tmp_path: Path) -> None:
    config = config_only(tmp_path, tie_word_embeddings=False)
    sizes = {kind: weight_bytes(load_weights(tmp_path, config, torch.bfloat16, CPU,
                                             load_format="dummy", quantization=kind))
             for kind in ("none", "int8", "int4")}
    assert sizes["int4"] < sizes["int8"] < sizes["none"]


@pytest.mark.parametrize("change, message", [
    (dict(quantization="int3"), "--quantization must be one of"),
    (dict(quantization="int4", quantization_group_size=128), "--quantization-group-size"),
    (dict(quantization="gguf", quantization_group_size=64), "blocks of 32"),
    (dict(quantization="gguf", load_format="dummy"), "--load-format dummy"),
    (dict(quantization="gguf", load_format="safetensors"), "--load-format safetensors"),
])
def test_bad_settings_are_named(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EngineConfig(model="m", **change).check_quantization()


def test_good_settings_pass() -> None:
    for kind in ("none", "int8", "int4"):
        for group in (32, 64):
            EngineConfig(model="m", quantization=kind,
                         quantization_group_size=group).check_quantization()
    EngineConfig(model="m", quantization="gguf").check_quantization()
