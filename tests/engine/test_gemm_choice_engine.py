"""The measured GEMM choice in the engine: where it picks oneDNN for a step's row count, the C
layer loop hands those projections to oneDNN (a callback) and still equals the Python loop bit
for bit; tokens stay those of plain F.linear; a failing oneDNN call surfaces as an error."""
from __future__ import annotations

import pytest
import torch

from engine_svc.params import StoppingParams
from kernels.cpu import gemm_choice as gc
from kernels.cpu import linear as cpu_linear
from tests.engine.helpers import GREEDY, make_engine
from tests.engine.test_native_layers import _mixed_step

pytestmark = pytest.mark.skipif(
    not (cpu_linear.native_available()
         and cpu_linear.can_prepack(torch.zeros(1, 1, dtype=torch.bfloat16))),
    reason="needs the AVX512-BF16 C kernel and oneDNN's bf16 linear")

SHAPES = ("qkv", "o", "gate_up", "down", "lm_head")


def _forced_table(onednn_from_bucket: dict[str, int]):
    """A chooser that measures nothing: shape -> oneDNN from that bucket index on."""
    def choose(candidates, identity, cache_dir, cache_bytes=None, clock=None):
        shapes = {}
        for name in SHAPES:
            first = onednn_from_bucket.get(name, len(gc.BUCKET_ROWS))
            buckets = [gc.BucketTiming(rows, [1.0], [1.0], gc.ONEDNN if i >= first else gc.NATIVE)
                       for i, rows in enumerate(gc.BUCKET_ROWS)]
            shapes[name] = gc.ShapeChoice(name, 1, 1, buckets)
        return gc.GemmTable(shapes, source="measured")
    return choose


@pytest.fixture
def auto_gemm(monkeypatch):
    monkeypatch.delenv("LLMSERVE_CPU_GEMM", raising=False)
    monkeypatch.delenv("LLMSERVE_CPU_LAYERS", raising=False)
    return monkeypatch


@pytest.mark.parametrize("arch, kv_heads", [("qwen2", 1), ("llama", 2)])
def test_c_loop_with_onednn_projections_equals_the_python_loop(tmp_path, make_tiny_model,
                                                               auto_gemm, arch, kv_heads):
    # the mixed step has 3 decode tokens + a 13-token chunk = 16 rows: bucket 32
    auto_gemm.setattr(gc, "choose", _forced_table({"qkv": 2, "gate_up": 1, "down": 2}))
    model_dir = make_tiny_model(tmp_path, arch=arch, num_kv_heads=kv_heads, seed=3)
    engine = make_engine(model_dir, dtype="bfloat16", max_num_batched_tokens=16)
    model, cache = engine.runner.model, engine.runner.cache
    assert model.native is not None and model.linear is cpu_linear.chosen_linear
    plan = _mixed_step(engine, torch.Generator().manual_seed(9))
    batch, _ = engine.runner._build_batch(plan)
    tokens = batch.input_ids.shape[0]
    assert model.native.hooked_mask(tokens) == 0b1101 and model.native.hooked_mask(1) == 0
    calls = []
    run_hook = model.native._run_hook
    model.native._run_hook = lambda layer, which: calls.append((layer, which)) or run_hook(
        layer, which)
    model.native._hook = type(model.native._hook)(model.native._run_hook)
    before = [t.clone() for t in cache.k + cache.v]
    native_logits = model.forward(batch, cache)
    native_kv = [t.clone() for t in cache.k + cache.v]
    assert sorted(calls) == [(layer, which) for layer in range(len(model.weights.layers))
                             for which in (0, 2, 3)]
    for pool, saved in zip(cache.k + cache.v, before):
        pool.copy_(saved)
    native, model.native = model.native, None
    try:
        python_logits = model.forward(batch, cache)
    finally:
        model.native = native
    assert torch.equal(native_logits, python_logits)
    assert all(torch.equal(a, b) for a, b in zip(native_kv, cache.k + cache.v))
    assert native_logits.abs().sum() > 0


def test_mixed_choice_generates_the_tokens_of_plain_f_linear(tmp_path, make_tiny_model,
                                                             auto_gemm):
    model_dir = make_tiny_model(tmp_path, arch="qwen2", num_kv_heads=1, seed=11)
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 320, (n,), generator=generator).tolist() for n in (3, 30, 61)]
    stopping = StoppingParams(max_new_tokens=20, ignore_eos=True)
    auto_gemm.setattr(gc, "choose", _forced_table({name: 1 for name in SHAPES}))
    mixed = make_engine(model_dir, dtype="bfloat16")
    assert cpu_linear.plan_of(mixed.runner.model.weights.layers[0].o_proj) is not None
    outputs = mixed.generate(prompts, GREEDY, stopping)
    auto_gemm.setattr(cpu_linear, "can_prepack", lambda weight: False)
    auto_gemm.setattr(cpu_linear, "can_pack_native", lambda weight: False)
    plain = make_engine(model_dir, dtype="bfloat16")
    assert plain.generate(prompts, GREEDY, stopping) == outputs


def test_a_failing_onednn_projection_raises_and_the_engine_goes_on(tmp_path, make_tiny_model,
                                                                   auto_gemm):
    auto_gemm.setattr(gc, "choose", _forced_table({"o": 0}))
    engine = make_engine(make_tiny_model(tmp_path, seed=4), dtype="bfloat16",
                         max_num_batched_tokens=16)
    model, cache = engine.runner.model, engine.runner.cache
    plan = _mixed_step(engine, torch.Generator().manual_seed(2))
    batch, _ = engine.runner._build_batch(plan)
    real = cpu_linear.packed_linear

    def broken(*args):
        raise MemoryError("oneDNN ran out")

    auto_gemm.setattr(cpu_linear, "packed_linear", broken)
    with pytest.raises(RuntimeError, match="through oneDNN failed") as raised:
        model.forward(batch, cache)
    assert isinstance(raised.value.__cause__, MemoryError)
    auto_gemm.setattr(cpu_linear, "packed_linear", real)
    logits = model.forward(batch, cache)
    assert logits.shape[0] == len(batch.logits_index) and torch.isfinite(logits).all()
