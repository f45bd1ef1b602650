"""Shared helpers for engine tests: HF reference generation and engine construction."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from engine_svc.config import EngineConfig
from engine_svc.engine import LLMEngine
from engine_svc.params import SamplingParams, StoppingParams

GREEDY = SamplingParams(temperature=0.0)


def make_engine(model_dir: Path, **overrides) -> LLMEngine:
    """An fp32 CPU engine over `model_dir` with small, test-friendly limits."""
    settings = dict(model=str(model_dir), dtype="float32", device="cpu", backend="torch",
                    max_model_len=512, max_num_seqs=16, max_num_batched_tokens=512,
                    kv_capacity_tokens=4096)
    settings.update(overrides)
    return LLMEngine(EngineConfig(**settings))


def hf_greedy(model_dir: Path, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Token ids that transformers' generate(do_sample=False) produces after `prompt`."""
    model = _hf_model(model_dir)
    config = copy.deepcopy(model.generation_config)
    config.do_sample = False
    config.pad_token_id = 0
    tokens = list(prompt)
    # generate() stops at eos; the engine's ignore_eos keeps going, so resume after an eos
    while len(tokens) - len(prompt) < max_new_tokens:
        config.max_new_tokens = max_new_tokens - (len(tokens) - len(prompt))
        with torch.inference_mode():
            out = model.generate(torch.tensor([tokens]), attention_mask=torch.ones(1, len(tokens),
                                 dtype=torch.int64), generation_config=config)
        tokens = out[0].tolist()
    return tokens[len(prompt):]


def hf_last_logits(model_dir: Path, prompt: list[int]) -> torch.Tensor:
    """transformers' fp32 logits [vocab] at the prompt's last position."""
    with torch.inference_mode():
        return _hf_model(model_dir)(torch.tensor([prompt])).logits[0, -1].float()


_HF_CACHE: dict[str, object] = {}


def _hf_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    key = str(model_dir)
    if key not in _HF_CACHE:
        _HF_CACHE.clear()
        _HF_CACHE[key] = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32).eval()
    return _HF_CACHE[key]


def run_alone(engine: LLMEngine, prompt: list[int], max_new_tokens: int,
              sampling: SamplingParams = GREEDY) -> list[int]:
    return engine.generate([prompt], sampling, StoppingParams(max_new_tokens=max_new_tokens,
                                                              ignore_eos=True))[0]
