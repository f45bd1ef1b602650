"""Greedy parity with Hugging Face transformers on the same fp32 weights."""
from __future__ import annotations

import pytest
import torch

from engine_svc.params import StoppingParams
from tests.engine.helpers import GREEDY, hf_greedy, hf_last_logits, make_engine

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "List three colors of the rainbow:",
    "<|im_start|>user\nWhat is 7 times 8?<|im_end|>\n<|im_start|>assistant\n",
]
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def smol(default_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    engine = make_engine(default_model_dir, max_model_len=1024)
    return engine, [tokenizer.encode(p) for p in PROMPTS]


def test_default_model_greedy_matches_transformers(smol, default_model_dir):
    engine, prompts = smol
    ours = engine.generate(prompts, GREEDY, StoppingParams(max_new_tokens=NEW_TOKENS,
                                                           ignore_eos=True))
    for prompt, got in zip(prompts, ours):
        assert got == hf_greedy(default_model_dir, prompt, NEW_TOKENS)
    assert engine.pool.num_used == engine.prefix_cache.num_cached_tokens  # only the tree holds rows


def test_default_model_prefill_logits_match(smol, default_model_dir):
    engine, prompts = smol
    for prompt in prompts:
        ours = prompt_logits(engine, prompt)
        ref = hf_last_logits(default_model_dir, prompt)
        assert (ours - ref).abs().max().item() <= 1e-3


@pytest.mark.parametrize("arch,kv_heads", [("llama", 2), ("qwen2", 1), ("llama", 4)])
def test_tiny_random_model_matches_transformers(tmp_path, make_tiny_model, arch, kv_heads):
    model_dir = make_tiny_model(tmp_path, arch=arch, num_kv_heads=kv_heads, seed=kv_heads)
    engine = make_engine(model_dir)
    generator = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 320, (n,), generator=generator).tolist() for n in (5, 17, 40)]
    ours = engine.generate(prompts, GREEDY, StoppingParams(max_new_tokens=24, ignore_eos=True))
    for prompt, got in zip(prompts, ours):
        assert got == hf_greedy(model_dir, prompt, 24)
        assert (prompt_logits(engine, prompt) - hf_last_logits(model_dir, prompt)).abs().max() <= 1e-4


def prompt_logits(engine, prompt: list[int]) -> torch.Tensor:
    """The engine's logits at the prompt's last token, through the pool and the scheduler."""
    from engine_svc.sequence import Sequence

    engine.scheduler.add(Sequence("logits-probe", list(prompt), GREEDY,
                                  StoppingParams(max_new_tokens=1)))
    plan = engine.scheduler.schedule()
    batch, _ = engine.runner._build_batch(plan)
    logits = engine.runner.model.forward(batch, engine.runner.cache)[0]
    engine.scheduler.commit(plan)
    from engine_svc.params import FinishReason
    engine.scheduler.finish(plan.prefill[0].seq, FinishReason.ABORTED)
    return logits


@pytest.mark.skipif(not __import__("kernels.cpu.linear", fromlist=["x"]).can_prepack(
    torch.zeros(1, 1, dtype=torch.bfloat16)), reason="no oneDNN bf16 linear in this torch build")
@pytest.mark.parametrize("pack_format", ["native", "onednn"])
def test_bf16_prepacked_projections_change_no_token(tmp_path, make_tiny_model, monkeypatch,
                                                    pack_format):
    """bf16 on CPU packs the projections once (for the C kernel, or reordered for oneDNN);
    outputs must be what plain F.linear gives, for prefill, decode and a mixed batch."""
    from kernels.cpu import linear as cpu_linear

    monkeypatch.setenv("LLMSERVE_CPU_GEMM", pack_format)
    if pack_format == "native" and not cpu_linear.native_available():
        pytest.skip("no AVX512-BF16 build of the C kernels here")
    model_dir = make_tiny_model(tmp_path, arch="qwen2", num_kv_heads=1, seed=11)  # has QKV bias
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 320, (n,), generator=generator).tolist() for n in (3, 30, 61)]
    stopping = StoppingParams(max_new_tokens=20, ignore_eos=True)
    packed_engine = make_engine(model_dir, dtype="bfloat16")
    qkv = packed_engine.runner.model.weights.layers[0].qkv_proj
    assert (qkv.dim() == 3) if pack_format == "native" else qkv.is_mkldnn
    packed = packed_engine.generate(prompts, GREEDY, stopping)
    monkeypatch.setattr(cpu_linear, "can_prepack", lambda weight: False)
    monkeypatch.setattr(cpu_linear, "can_pack_native", lambda weight: False)
    plain_engine = make_engine(model_dir, dtype="bfloat16")
    qkv = plain_engine.runner.model.weights.layers[0].qkv_proj
    assert qkv.dim() == 2 and not qkv.is_mkldnn
    assert plain_engine.generate(prompts, GREEDY, stopping) == packed
    assert packed_engine.runner.memory_stats()["weights"] == \
        plain_engine.runner.memory_stats()["weights"] + (
            0 if not packed_engine.runner.model_config.tie_word_embeddings
            else packed_engine.runner.model.weights.lm_head.numel() * 2)
