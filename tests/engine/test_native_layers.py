"""All decoder layers in one C call (kernels/cpu/layer_loop.py over
kernels/cpu/csrc/forward_layers.c, which re-encodes the model's layer order) against the Python
loop of the same kernels (LlamaModel._layers): identical logits and K/V for bf16 and for int8 /
int4 models on every quantized route, the same errors, and used only where it applies."""
from __future__ import annotations

import pytest
import torch

from engine_svc.params import StoppingParams
from kernels.cpu import gemm_choice as gc
from kernels.cpu import linear as cpu_linear
from kernels.cpu import quant_linear
from tests.engine.helpers import GREEDY, make_engine

needs_native = pytest.mark.skipif(not cpu_linear.native_available(),
                                  reason="no AVX512-BF16 build of the C kernels here")
needs_quant = pytest.mark.skipif(
    not (cpu_linear.native_available() and quant_linear.vnni_available()),
    reason="no AVX512-BF16 and VNNI build of the C kernels here")


def _mixed_step(engine, generator: torch.Generator):
    """A plan with three decoding requests and a prompt chunk after its first chunk (the
    engine's token budget is 16)."""
    def add(name: str, length: int) -> None:
        prompt = torch.randint(3, 320, (length,), generator=generator).tolist()
        engine.add_request(name, prompt, GREEDY, StoppingParams(max_new_tokens=32,
                                                                ignore_eos=True))

    for index, length in enumerate((3, 10, 5)):
        add(f"decoding-{index}", length)
    while engine.last_step.phase != "decode":
        engine.step()
    add("chunked", 40)
    engine.step()
    plan = engine.scheduler.schedule()
    assert len(plan.decode) == 3 and len(plan.prefill) == 1 and plan.prefill[0].start > 0
    return plan


def _assert_loops_equal(engine) -> None:
    """One mixed step through the C loop and through the Python loop: the same logits and
    K/V bit for bit."""
    model, cache = engine.runner.model, engine.runner.cache
    plan = _mixed_step(engine, torch.Generator().manual_seed(9))
    batch, _ = engine.runner._build_batch(plan)
    before = [t.clone() for t in cache.k + cache.v]
    native_logits = model.forward(batch, cache)
    native_kv = [t.clone() for t in cache.k + cache.v]
    for pool, saved in zip(cache.k + cache.v, before):   # the Python loop writes the rows anew
        pool.copy_(saved)
    native, model.native = model.native, None
    try:
        python_logits = model.forward(batch, cache)
    finally:
        model.native = native
    assert torch.equal(native_logits, python_logits)
    assert all(torch.equal(a, b) for a, b in zip(native_kv, cache.k + cache.v))
    assert not all(torch.equal(a, b) for a, b in zip(native_kv, before))   # rows were written
    assert native_logits.abs().sum() > 0


@needs_native
@pytest.mark.parametrize("arch, kv_heads", [("qwen2", 1), ("llama", 2)])
def test_native_layers_equal_the_python_loop(tmp_path, make_tiny_model, arch, kv_heads):
    model_dir = make_tiny_model(tmp_path, arch=arch, num_kv_heads=kv_heads, seed=3)
    engine = make_engine(model_dir, dtype="bfloat16", max_num_batched_tokens=16)
    assert engine.runner.model.native is not None   # packed bf16 on the CPU ops: the C loop
    _assert_loops_equal(engine)


# LLMSERVE_CPU_GEMM -> the route every quantized projection takes, and the step's masks
# (hooked: oneDNN through the callback; dequant: panels in C)
ROUTE_MODES = {"native": ("vnni", 0, 0), "dequant": ("panel", 0, 0b1111),
               "onednn": ("dense", 0b1111, 0)}


@needs_quant
@pytest.mark.parametrize("quantization", ["int8", "int4"])
@pytest.mark.parametrize("mode", sorted(ROUTE_MODES))
def test_native_layers_equal_the_python_loop_for_quantized_models(
        tmp_path, make_tiny_model, monkeypatch, quantization, mode):
    monkeypatch.setenv("LLMSERVE_CPU_GEMM", mode)
    model_dir = make_tiny_model(tmp_path, arch="qwen2", num_kv_heads=1, seed=3)   # qkv bias
    engine = make_engine(model_dir, dtype="bfloat16", max_num_batched_tokens=16,
                         quantization=quantization)
    model = engine.runner.model
    assert model.native is not None
    route, hooked, dequant = ROUTE_MODES[mode]
    for name in cpu_linear.PROJECTIONS:
        weight = getattr(model.weights.layers[0], name)
        assert isinstance(weight, quant_linear.PackedQuant) and weight.kind == quantization
        assert set(weight.routes) == {route}
    assert (model.native.hooked_mask(16), model.native.dequant_mask(16)) == (hooked, dequant)
    _assert_loops_equal(engine)


@needs_quant
def test_native_layers_mix_quantized_routes_per_projection(tmp_path, make_tiny_model,
                                                           monkeypatch):
    """The measured choice sends qkv and down through dequantized panels at the step's 16
    rows, o and gate_up through VNNI: still the Python loop's numbers."""
    monkeypatch.delenv("LLMSERVE_CPU_GEMM", raising=False)
    monkeypatch.setattr(quant_linear, "dequant_route", lambda: "panel")

    def choose(candidates, identity, cache_dir, cache_bytes=None):
        def picks(name, labels):
            dequantized = name in ("qkv", "down")
            return [labels[int(dequantized and rows >= 32)] for rows in gc.BUCKET_ROWS]
        return gc.GemmTable({c.name: gc.ShapeChoice(c.name, 1, 1, [
            gc.BucketTiming(rows, [1.0], [1.0], pick)
            for rows, pick in zip(gc.BUCKET_ROWS, picks(c.name, c.labels))], c.labels)
            for c in candidates}, source="measured")

    monkeypatch.setattr(gc, "choose", choose)
    engine = make_engine(make_tiny_model(tmp_path, seed=6), dtype="bfloat16",
                         max_num_batched_tokens=16, quantization="int4")
    native = engine.runner.model.native
    assert native is not None
    assert (native.hooked_mask(16), native.dequant_mask(16)) == (0, 0b1001)
    assert native.dequant_mask(1) == 0
    _assert_loops_equal(engine)


@needs_native
def test_native_layers_refuse_bad_rows_slots_and_positions(tmp_path, make_tiny_model):
    engine = make_engine(make_tiny_model(tmp_path, seed=4), dtype="bfloat16",
                         max_num_batched_tokens=16)
    model, cache = engine.runner.model, engine.runner.cache
    plan = _mixed_step(engine, torch.Generator().manual_seed(2))
    capacity = cache.k[0].shape[0]
    for field, value, message in [("out_rows", capacity, "pool row"),
                                  ("positions", 10**6, "position"),
                                  ("slots", cache.req_to_token.shape[0], "slot")]:
        batch, _ = engine.runner._build_batch(plan)
        getattr(batch, field)[0] = value
        with pytest.raises(IndexError, match=message):
            model.forward(batch, cache)
    batch, _ = engine.runner._build_batch(plan)   # and the engine goes on afterwards
    logits = model.forward(batch, cache)
    assert logits.shape[0] == len(batch.logits_index) and torch.isfinite(logits).all()


def test_native_layers_only_where_they_apply(tmp_path, make_tiny_model, monkeypatch):
    model_dir = make_tiny_model(tmp_path, seed=5)
    assert make_engine(model_dir).runner.model.native is None            # fp32: MKL, Python loop
    monkeypatch.setenv("LLMSERVE_CPU_LAYERS", "python")
    assert make_engine(model_dir, dtype="bfloat16").runner.model.native is None
    monkeypatch.setenv("LLMSERVE_CPU_LAYERS", "native")
    monkeypatch.setenv("LLMSERVE_CPU_GEMM", "onednn")                   # oneDNN-packed weights
    engine = make_engine(model_dir, dtype="bfloat16")
    assert engine.runner.model.native is None
    assert engine.runner.model.ops.layer_loop(engine.runner.model_config,
                                              engine.runner.model.weights,
                                              engine.runner.model.cos_sin, 1.0) is None
