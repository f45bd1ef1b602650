"""The GGUF tensor reader (engine_svc/gguf_file.py, engine_svc/gguf_weights.py): quantized tensors
load as QuantizedWeight whose values are the gguf package's own dequantization bit for bit, Q/K
rows come out as convert_gguf un-permutes them in float32, and the converted default model's
model.gguf loads to the converted safetensors' values."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402

from engine_svc import convert_gguf  # noqa: E402
from engine_svc.gguf_file import GgufFile, MetadataView  # noqa: E402
from engine_svc.gguf_metadata import ConversionError, read_hyper_params  # noqa: E402
from engine_svc.gguf_weights import read_tensor  # noqa: E402
from engine_svc.model_config import ModelConfig  # noqa: E402
from engine_svc.weights import load_weights  # noqa: E402
from kernels.quant import QuantizedWeight, check, dequantize  # noqa: E402

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, VOCAB, LAYERS = 64, 96, 4, 2, 16, 96, 3


def awkward_values(rows: int, cols: int, seed: int) -> np.ndarray:
    """float32 [rows, cols] with the blocks quantizers get wrong: all zero, constant, one spike."""
    values = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    values[0, :32] = 0.0
    values[1, :32] = 0.25
    values[2, 32:64] = 0.0
    values[2, 40] = -3.0
    return values


def write_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, QT]],
               metadata: dict[str, object] | None = None) -> dict[str, np.ndarray]:
    """Write float32 `tensors` quantized as given with gguf.GGUFWriter; returns the stored bytes."""
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in (metadata or {}).items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, list):
            writer.add_array(key, value)
        else:
            writer.add_string(key, str(value))
    stored = {}
    for name, (values, kind) in tensors.items():
        data = gguf.quants.quantize(values, kind)
        stored[name] = data
        writer.add_tensor(name, data, raw_dtype=kind)   # shape from the byte shape
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


@pytest.mark.parametrize("kind", [QT.Q8_0, QT.Q4_0, QT.Q4_1])
def test_quantized_tensor_equals_gguf_dequantize(tmp_path: Path, kind: QT) -> None:
    values = awkward_values(6, 96, seed=int(kind))
    stored = write_gguf(tmp_path / "t.gguf", {"w": (values, kind)})
    (tensor,) = GgufFile(tmp_path / "t.gguf").tensors
    weight = read_tensor(tensor)
    assert isinstance(weight, QuantizedWeight)
    check(weight)
    assert (weight.kind, weight.group_size, weight.shape) == (
        "int8" if kind == QT.Q8_0 else "int4", 32, (6, 96))
    expected = gguf.quants.dequantize(stored["w"], kind)            # float32 [6, 96]
    assert np.array_equal(dequantize(weight).numpy(), expected)
    assert not np.array_equal(expected, values)   # the data really went through quantization


@pytest.mark.parametrize("kind, dtype", [(QT.F32, torch.float32), (QT.F16, torch.float16),
                                         (QT.BF16, torch.bfloat16)])
def test_plain_tensor_keeps_its_values(tmp_path: Path, kind: QT, dtype: torch.dtype) -> None:
    values = awkward_values(3, 64, seed=7)
    stored = write_gguf(tmp_path / "p.gguf", {"norm": (values[0], kind), "w": (values, kind)})
    norm, matrix = (read_tensor(t) for t in GgufFile(tmp_path / "p.gguf").tensors)
    assert (norm.dtype, tuple(norm.shape), matrix.dtype, tuple(matrix.shape)) == (
        dtype, (64,), dtype, (3, 64))
    expected = gguf.quants.dequantize(stored["w"], kind)
    assert np.array_equal(matrix.float().numpy(), expected)


def test_unsupported_type_names_tensor_and_type(tmp_path: Path) -> None:
    write_gguf(tmp_path / "q5.gguf", {"blk.0.ffn_up.weight": (awkward_values(4, 64, 1), QT.Q5_0)})
    (tensor,) = GgufFile(tmp_path / "q5.gguf").tensors
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_up\.weight.*Q5_0"):
        read_tensor(tensor)


def test_metadata_matches_gguf_reader(tmp_path: Path) -> None:
    meta = llama_metadata()
    write_gguf(tmp_path / "m.gguf", {"w": (awkward_values(4, 64, 2), QT.F32)}, meta)
    ours = read_hyper_params(MetadataView(GgufFile(tmp_path / "m.gguf").metadata))
    theirs = read_hyper_params(gguf.GGUFReader(str(tmp_path / "m.gguf")))
    assert ours == theirs
    assert ours.num_kv_heads == KV_HEADS and ours.rms_norm_eps == pytest.approx(1e-5)


def test_truncated_file_is_a_clear_error(tmp_path: Path) -> None:
    write_gguf(tmp_path / "t.gguf", {"w": (awkward_values(64, 64, 3), QT.Q8_0)})
    data = (tmp_path / "t.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:-100])
    with pytest.raises(ValueError, match="past the end"):
        GgufFile(tmp_path / "cut.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"NOPE" + data[4:])
    with pytest.raises(ValueError, match="not a GGUF"):
        GgufFile(tmp_path / "bad.gguf")


# ---------------------------------------------------------------- a tiny llama GGUF


def llama_metadata() -> dict[str, object]:
    return {"llama.block_count": LAYERS, "llama.context_length": 256,
            "llama.embedding_length": HIDDEN, "llama.feed_forward_length": INTER,
            "llama.attention.head_count": HEADS, "llama.attention.head_count_kv": KV_HEADS,
            "llama.rope.dimension_count": HEAD_DIM, "llama.rope.freq_base": 10000.0,
            "llama.attention.layer_norm_rms_epsilon": 1e-5}


def tiny_llama_gguf(model_dir: Path, projection_kind: QT = QT.Q4_1,
                    tied: bool = True) -> Path:
    """A converted-like directory: config.json + model.gguf of a random 3-layer llama."""
    rng = np.random.default_rng(0)

    def rand(*shape: int) -> np.ndarray:
        return (0.1 * rng.standard_normal(shape)).astype(np.float32)

    kinds = [projection_kind, QT.Q8_0, QT.Q4_0]   # layers differ, so every kind is read
    tensors: dict[str, tuple[np.ndarray, QT]] = {
        "token_embd.weight": (rand(VOCAB, HIDDEN), QT.Q8_0),
        "output_norm.weight": (1 + rand(HIDDEN), QT.F32)}
    if not tied:
        tensors["output.weight"] = (rand(VOCAB, HIDDEN), QT.Q8_0)
    for layer in range(LAYERS):
        kind = kinds[layer % len(kinds)]
        shapes = {"attn_q": (HEADS * HEAD_DIM, HIDDEN), "attn_k": (KV_HEADS * HEAD_DIM, HIDDEN),
                  "attn_v": (KV_HEADS * HEAD_DIM, HIDDEN), "attn_output": (HIDDEN, HIDDEN),
                  "ffn_gate": (INTER, HIDDEN), "ffn_up": (INTER, HIDDEN),
                  "ffn_down": (HIDDEN, INTER)}
        for name, shape in shapes.items():
            tensors[f"blk.{layer}.{name}.weight"] = (rand(*shape), kind)
        for name in ("attn_norm", "ffn_norm"):
            tensors[f"blk.{layer}.{name}.weight"] = (1 + rand(HIDDEN), QT.F32)
    model_dir.mkdir(parents=True, exist_ok=True)
    write_gguf(model_dir / "model.gguf", tensors, llama_metadata())
    hp = read_hyper_params(MetadataView(GgufFile(model_dir / "model.gguf").metadata))
    config = convert_gguf.model_config(hp, VOCAB, tied, {"bos": 1, "eos": 2, "pad": 2})
    (model_dir / "config.json").write_text(json.dumps(config))
    return model_dir


def converted_fp32(model_dir: Path) -> dict[str, torch.Tensor]:
    """What convert_gguf writes into model.safetensors for this GGUF (float32, Q/K un-permuted)."""
    reader = gguf.GGUFReader(str(model_dir / "model.gguf"))
    return convert_gguf.convert_tensors(reader, read_hyper_params(reader))


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_llama_loads_as_convert_gguf_converts(tmp_path: Path, tied: bool) -> None:
    model_dir = tiny_llama_gguf(tmp_path / "m", tied=tied)
    config = ModelConfig.from_dir(model_dir)
    weights = load_weights(model_dir, config, torch.bfloat16, torch.device("cpu"),
                           quantization="gguf")
    state = converted_fp32(model_dir)
    for index, layer in enumerate(weights.layers):
        prefix = f"model.layers.{index}."
        attn = [state[f"{prefix}self_attn.{n}_proj.weight"] for n in "qkv"]
        mlp = [state[f"{prefix}mlp.{n}_proj.weight"] for n in ("gate", "up")]
        pairs = [(layer.qkv_proj, torch.cat(attn)), (layer.gate_up_proj, torch.cat(mlp)),
                 (layer.o_proj, state[f"{prefix}self_attn.o_proj.weight"]),
                 (layer.down_proj, state[f"{prefix}mlp.down_proj.weight"])]
        for weight, expected in pairs:
            assert isinstance(weight, QuantizedWeight)
            check(weight)
            assert torch.equal(dequantize(weight), expected)   # un-permuted rows, exact values
        assert torch.equal(layer.input_norm,
                           state[f"{prefix}input_layernorm.weight"].to(torch.bfloat16))
    assert [layer.qkv_proj.kind for layer in weights.layers] == ["int4", "int8", "int4"]
    embed = state["model.embed_tokens.weight"]
    assert weights.embed_tokens.dtype == torch.bfloat16
    assert torch.equal(weights.embed_tokens, embed.to(torch.bfloat16))   # gathered: plain
    assert isinstance(weights.lm_head, QuantizedWeight) and weights.lm_head.kind == "int8"
    head = embed if tied else state["lm_head.weight"]
    assert torch.equal(dequantize(weights.lm_head), head)                # the Q8_0 itself


def test_gguf_that_is_not_the_models_is_refused(tmp_path: Path) -> None:
    model_dir = tiny_llama_gguf(tmp_path / "m")
    raw = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**raw, "intermediate_size": 128}))
    with pytest.raises(ValueError, match="intermediate_size=96"):
        load_weights(model_dir, ModelConfig.from_dir(model_dir), torch.float32,
                     torch.device("cpu"), quantization="gguf")


def test_missing_model_gguf_says_how_to_add_it(tmp_path: Path) -> None:
    model_dir = tiny_llama_gguf(tmp_path / "m")
    (model_dir / "model.gguf").unlink()
    with pytest.raises(ValueError, match="model.gguf not found.*make model"):
        load_weights(model_dir, ModelConfig.from_dir(model_dir), torch.float32,
                     torch.device("cpu"), quantization="gguf")


# ---------------------------------------------------------------- converter keeps the GGUF


def test_converter_adds_model_gguf_to_an_older_conversion(tmp_path: Path) -> None:
    source = tiny_llama_gguf(tmp_path / "src") / "model.gguf"
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text((source.parent / "config.json").read_text())
    (out / convert_gguf.COMPLETE_MARKER).write_text(f"converted from {source.name}\n")
    convert_gguf.run(out, str(source))
    assert (out / "model.gguf").read_bytes() == source.read_bytes()
    convert_gguf.run(out, str(source))   # now a no-op
    other = tmp_path / "other.gguf"
    other.write_bytes(source.read_bytes())
    (out / "model.gguf").unlink()
    with pytest.raises(ConversionError, match="converted from model.gguf"):
        convert_gguf.run(out, str(other))


# ---------------------------------------------------------------- the default model


def test_default_model_gguf_equals_converted_safetensors(default_model_dir: Path) -> None:
    if not (default_model_dir / "model.gguf").is_file():
        pytest.skip("the default model directory has no model.gguf: run `make model`")
    from safetensors import safe_open

    config = ModelConfig.from_dir(default_model_dir)
    weights = load_weights(default_model_dir, config, torch.bfloat16, torch.device("cpu"),
                           quantization="gguf")
    with safe_open(str(default_model_dir / "model.safetensors"), "pt") as saved:
        for index in (0, 17, config.num_layers - 1):
            prefix = f"model.layers.{index}."
            qkv = torch.cat([saved.get_tensor(f"{prefix}self_attn.{n}_proj.weight") for n in "qkv"])
            layer = weights.layers[index]
            assert layer.qkv_proj.kind == "int4" and layer.down_proj.kind == "int4"   # Q4_1
            assert torch.equal(dequantize(layer.qkv_proj), qkv)
            assert torch.equal(dequantize(layer.down_proj),
                               saved.get_tensor(f"{prefix}mlp.down_proj.weight"))
        embed = saved.get_tensor("model.embed_tokens.weight")
    assert torch.equal(dequantize(weights.lm_head), embed)            # Q8_0, tied
    assert torch.equal(weights.embed_tokens, embed.to(torch.bfloat16))
