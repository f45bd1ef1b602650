"""Shared pytest fixtures: tiny random HF models and the converted default model directory."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "smollm2-135m-instruct"

TINY_VOCAB = 320
TINY_HIDDEN = 64
TINY_INTERMEDIATE = 128
TINY_MAX_POSITIONS = 512
TINY_BOS_ID = 1
TINY_EOS_ID = 2


def build_tiny_model(tmp_path: Path, *, arch: str = "llama", num_heads: int = 4, num_kv_heads: int = 2,
                     head_dim: int = 16, num_layers: int = 2, tie: bool = False, seed: int = 0,
                     max_shard_size: str | None = None, name: str | None = None) -> Path:
    """Save a tiny random fp32 HF model (llama or qwen2) under tmp_path and return its directory.

    Norm weights and biases are perturbed away from HF's 1/0 init so that a kernel that ignores
    them gives different logits. `max_shard_size` (e.g. "100KB") makes a sharded checkpoint.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(
        vocab_size=TINY_VOCAB, hidden_size=TINY_HIDDEN, intermediate_size=TINY_INTERMEDIATE,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        head_dim=head_dim, max_position_embeddings=TINY_MAX_POSITIONS, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=tie, bos_token_id=TINY_BOS_ID,
        eos_token_id=TINY_EOS_ID, pad_token_id=TINY_EOS_ID,
    )
    if arch == "llama":
        config, model_cls = LlamaConfig(**common), LlamaForCausalLM
    elif arch == "qwen2":
        config, model_cls = Qwen2Config(**common, use_sliding_window=False), Qwen2ForCausalLM
    else:
        raise ValueError(f"arch must be 'llama' or 'qwen2', got {arch!r}")
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "norm" in param_name or param_name.endswith(".bias"):
                param.add_(0.1 * torch.randn_like(param))
    out_dir = tmp_path / (name or f"tiny-{arch}-kv{num_kv_heads}-{'tied' if tie else 'untied'}-s{seed}")
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    GenerationConfig(bos_token_id=TINY_BOS_ID, eos_token_id=TINY_EOS_ID,
                     pad_token_id=TINY_EOS_ID).save_pretrained(out_dir)
    return out_dir


@pytest.fixture
def make_tiny_model() -> Callable[..., Path]:
    """Factory fixture: `make_tiny_model(tmp_path, *, arch=..., num_kv_heads=..., tie=..., seed=...) -> Path`."""
    return build_tiny_model


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The converted SmolLM2-135M-Instruct directory (built by `make model`); skips if absent."""
    if not (DEFAULT_MODEL_DIR / ".complete").is_file():
        pytest.skip(f"{DEFAULT_MODEL_DIR} is not converted (no .complete); run `make model` first")
    return DEFAULT_MODEL_DIR
