"""The engine end to end with quantized weights on the CPU torch backend: --quantization int8 /
int4 / gguf generate, the weights gauge shows the smaller weights and the CPU pool's default
grows by what they free, the default model's greedy tokens stay close to bf16's, and bad flag
combinations fail with a message naming the flag."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine_svc.__main__ import main as engine_main
from engine_svc.engine import LLMEngine
from engine_svc.metrics import EngineMetrics
from engine_svc.params import StoppingParams
from engine_svc.weights import dense_weight_bytes
from kernels.quant import QuantizedWeight
from tests.engine.helpers import GREEDY, make_engine
from tests.unit.test_gguf_weights import tiny_llama_gguf

STOP = StoppingParams(max_new_tokens=12, ignore_eos=True)


def tiny_prompts(vocab: int) -> list[list[int]]:
    return [[(7 * i + 3) % vocab for i in range(n)] for n in (4, 19, 33)]


def weights_gauge(engine: LLMEngine) -> float:
    metrics = EngineMetrics(engine)
    return metrics.registry.get_sample_value("llmserve_device_memory_bytes", {"kind": "weights"})


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from tests.conftest import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("quant"), tie=True)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_int_quantized_engine_generates_and_returns_the_pool(tiny_dir: Path, kind: str) -> None:
    engine = make_engine(tiny_dir, dtype="bfloat16", quantization=kind)
    qkv = engine.runner.model.weights.layers[0].qkv_proj   # as the backend packed it
    assert isinstance(qkv, QuantizedWeight) or not isinstance(qkv, torch.Tensor)
    prompts = tiny_prompts(engine.model_config.vocab_size)
    first = engine.generate(prompts, GREEDY, STOP)
    assert [len(tokens) for tokens in first] == [12, 12, 12]
    assert all(0 <= t < engine.model_config.vocab_size for tokens in first for t in tokens)
    assert engine.generate(prompts, GREEDY, STOP) == first          # deterministic, cache reused
    assert engine.pool.num_used == engine.prefix_cache.num_cached_tokens


def test_gguf_engine_generates(tmp_path: Path) -> None:
    model_dir = tiny_llama_gguf(tmp_path / "m")
    engine = make_engine(model_dir, dtype="bfloat16", quantization="gguf")
    out = engine.generate(tiny_prompts(engine.model_config.vocab_size), GREEDY, STOP)
    assert [len(tokens) for tokens in out] == [12, 12, 12]


def test_smaller_weights_show_in_the_gauge_and_grow_the_cpu_pool(tiny_dir: Path) -> None:
    engines = {kind: make_engine(tiny_dir, dtype="bfloat16", quantization=kind,
                                 kv_capacity_tokens=None) for kind in ("none", "int8", "int4")}
    gauge = {kind: weights_gauge(engine) for kind, engine in engines.items()}
    capacity = {kind: engine.pool.capacity for kind, engine in engines.items()}
    assert gauge["int4"] < gauge["int8"] < gauge["none"]
    assert capacity["none"] == 16384                        # max(16384, max_model_len) as before
    runner = engines["none"].runner
    per_token = runner.kv_bytes_per_token()
    unquantized = dense_weight_bytes(runner.model_config, runner.dtype)
    for kind in ("int8", "int4"):   # the budget of unquantized weights + 16384 tokens, less these
        freed = unquantized - gauge[kind]
        assert capacity[kind] == 16384 + freed // per_token
    assert capacity["int4"] > capacity["int8"] > capacity["none"]
    given = make_engine(tiny_dir, dtype="bfloat16", quantization="int4", kv_capacity_tokens=4096)
    assert given.pool.capacity == 4096                      # the flag still wins


def test_bad_flag_combinations_exit_with_a_named_error(tiny_dir: Path, capsys) -> None:
    cases = [
        (["--quantization", "gguf", "--quantization-group-size", "64"], "blocks of 32"),
        (["--quantization", "gguf", "--load-format", "dummy"], "--load-format dummy"),
        (["--quantization", "gguf"], "model.gguf not found"),
        (["--quantization", "int8", "--dtype", "float16"], "needs --dtype bfloat16 or float32"),
    ]
    for flags, message in cases:
        code = engine_main(["--model", str(tiny_dir), "--device", "cpu", "--metrics-port", "-1",
                            "--port", "0", *flags])
        assert code == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        engine_main(["--model", str(tiny_dir), "--quantization", "int3"])


# ---------------------------------------------------------------- the default model

PROMPTS = ["The capital of France is", "def fibonacci(n):",
           "Once upon a time, in a land far away,", "List three colors of the rainbow:"]
NEW_TOKENS = 16
# the least fraction of the 4 x 16 greedy tokens equal to bf16's, position by position (tokens
# after a first difference mostly differ too). Measured on the 2-core EPYC with each route of
# the C kernels forced (LLMSERVE_CPU_GEMM=native/dequant/onednn, LLMSERVE_NATIVE=0 for the torch
# oracle): int8 0.77 / 0.66 / 0.84 / 0.84, gguf and int4 1.0 / 1.0 / 1.0 / 0.66 (int4 at group 32
# re-derives the model's own Q4_1 blocks: bench/perplexity.py). Near-ties flip with the route
# (fp32 vs bf16 agree on 0.62 of 5 x 64 tokens), so the bound sits below the lowest measured.
MIN_AGREEMENT = {"int8": 0.5, "gguf": 0.5, "int4": 0.5}


@pytest.fixture(scope="module")
def smol_prompts(default_model_dir: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    return [tokenizer.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def bf16_tokens(default_model_dir: Path, smol_prompts) -> list[list[int]]:
    engine = make_engine(default_model_dir, dtype="bfloat16")
    return engine.generate(smol_prompts, GREEDY, StoppingParams(max_new_tokens=NEW_TOKENS,
                                                                ignore_eos=True))


@pytest.mark.parametrize("kind", ["int8", "gguf", "int4"])
def test_default_model_greedy_agrees_with_bf16(default_model_dir: Path, smol_prompts,
                                               bf16_tokens, kind: str) -> None:
    if kind == "gguf" and not (default_model_dir / "model.gguf").is_file():
        pytest.skip("the default model directory has no model.gguf: run `make model`")
    engine = make_engine(default_model_dir, dtype="bfloat16", quantization=kind)
    ours = engine.generate(smol_prompts, GREEDY, StoppingParams(max_new_tokens=NEW_TOKENS,
                                                                ignore_eos=True))
    same = sum(a == b for got, ref in zip(ours, bf16_tokens) for a, b in zip(got, ref))
    assert same / (len(PROMPTS) * NEW_TOKENS) >= MIN_AGREEMENT[kind], (kind, ours, bf16_tokens)
    first_tokens = sum(got[0] == ref[0] for got, ref in zip(ours, bf16_tokens))
    assert first_tokens >= 3   # "List three colors of the rainbow:" is a near-tie at its first
