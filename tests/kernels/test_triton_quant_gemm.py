"""Triton W8A16 / W4A16 GEMM (kernels/triton/quant_gemm.py) against the torch oracle
kernels.quant.quantized_linear at odd shapes, its packing (kernels/triton/quant_pack.py), and the
Triton backend running a tiny model with quantized projections against the torch backend's ops
with the oracle's products (CPU interpreter / CUDA).

Tolerances are relative to the largest output: fp32 is exact up to summation order; bf16/fp16
also round each dequantized weight to the activation dtype (the interpreter rounds bf16 by
truncation, up to one bf16 ulp: 2^-8). The failures they must catch are all O(1) of the output:
nibbles swapped or misordered, an offset dropped (|offset| ~ 8 scales, every group), a group's
scale from another group (scales vary 16x across groups here), a K slice or the bias lost.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
import triton

from kernels import quant
from kernels.triton.quant_pack import PackedQuantWeight, pack, prepare_weights
from tests.kernels.conftest import REPO_ROOT

FORMATS = ["int8", "q8_0", "int4", "q4_1"]
TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}
N = 40  # output features: not a multiple of any BLOCK_N
# (rows, num_splits (None: the wrapper's choice, which splits these small grids), with bias)
ROW_CASES = [(1, None, True), (3, 1, False), (17, None, False), (65, 1, True)]


@pytest.fixture
def qgemm(device: torch.device) -> ModuleType:
    """quant_gemm for `device`: the interpreted copy on CPU, the compiled module on CUDA."""
    if device.type == "cpu":
        return importlib.import_module("_interpreted_kernels.quant_gemm")
    return importlib.import_module("kernels.triton.quant_gemm")


def _group_factors(rows: int, groups: int) -> torch.Tensor:
    """[rows, groups] magnitudes spread over 2^-2 .. 2^2 (a wrong group's scale shows)."""
    return 2.0 ** (4 * torch.rand(rows, groups) - 2)


def _fp16_exact(values: torch.Tensor) -> torch.Tensor:
    return values.half().float()


def make_weight(fmt: str, out_features: int, in_features: int, group: int) -> quant.QuantizedWeight:
    """int8 / int4: quantized from a float weight (fp32 scales; int4 symmetric, offsets -8 s).
    q8_0 / q4_1: GGUF-like random levels with fp16 scales (q4_1: and fp16 offsets like a block
    minimum: -4..-12 scales, not the symmetric -8)."""
    groups = in_features // group
    if fmt in ("int8", "int4"):
        dense = torch.randn(out_features, groups, group) * _group_factors(out_features, groups)[..., None]
        dense = dense.reshape(out_features, in_features)
        if fmt == "int4":
            return quant.quantize_int4(dense, group, symmetric=True)
        return quant.quantize(dense, fmt, group)
    scales = _fp16_exact(_group_factors(out_features, groups) / 64)
    if fmt == "q8_0":
        levels = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8)
        return quant.QuantizedWeight("int8", levels, scales, None, group)
    levels = torch.randint(0, 16, (out_features, in_features), dtype=torch.uint8)
    offsets = _fp16_exact(-scales * (4 + 8 * torch.rand(out_features, groups)))
    return quant.QuantizedWeight("int4", quant.pack_int4(levels), scales, offsets, group)


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    tol = TOLERANCE[dtype] * float(expected.float().abs().max())
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", quant.GROUP_SIZES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_gemm_equals_the_oracle(qgemm: ModuleType, device: torch.device, fmt: str, group: int,
                                dtype: torch.dtype) -> None:
    in_features = 3 * group  # 96 or 192: an odd number of groups
    weight = make_weight(fmt, N, in_features, group)
    packed = pack(weight).to(device)
    for rows, splits, with_bias in ROW_CASES:
        x = torch.randn(rows, in_features).to(dtype)
        bias = (torch.randn(N) * 4).to(dtype) if with_bias else None
        expected = quant.quantized_linear(x, weight, bias)
        actual = qgemm.quantized_linear(x.to(device), packed,
                                        bias.to(device) if with_bias else None, num_splits=splits)
        assert_matches(actual, expected, dtype)


def test_strided_rows_and_forced_splits(qgemm: ModuleType, device: torch.device) -> None:
    weight = make_weight("q4_1", N, 160, 32)   # 5 groups: uneven slices when split in 2 or 3
    packed = pack(weight).to(device)
    wide = torch.randn(6, 200)
    x = wide[:, 7:167]                          # rows 200 elements apart
    expected = quant.quantized_linear(x, weight)
    for splits in (1, 2, 3, 5, 9):
        assert_matches(qgemm.quantized_linear(x.to(device), packed, num_splits=splits), expected,
                       torch.float32)
    assert qgemm.quantized_linear(x[:0].to(device), packed).shape == (0, N)


def test_wrapper_rejects_bad_arguments(qgemm: ModuleType, device: torch.device) -> None:
    weight = make_weight("int8", N, 64, 32)
    packed = pack(weight).to(device)
    x = torch.zeros(2, 64, device=device)
    with pytest.raises(TypeError, match="PackedQuantWeight"):
        qgemm.quantized_linear(x, weight.to(device))
    with pytest.raises(ValueError, match="64 columns"):
        qgemm.quantized_linear(torch.zeros(2, 96, device=device), packed)
    with pytest.raises(ValueError, match="bias must have 40"):
        qgemm.quantized_linear(x, packed, torch.zeros(39, device=device))
    with pytest.raises(ValueError, match="x dtype"):
        qgemm.quantized_linear(x.double(), packed)


PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
# (format, group, dtype, rows, out, in, splits, bias): each tile config, both kernels, all kinds
SM90_LAUNCHES = r"""
import json, torch
from dataclasses import asdict
from kernels.triton.quant_gemm import quantized_linear
from kernels.triton.quant_pack import pack
from tests.kernels.aot_compile import compile_spec
from tests.kernels.jit_capture import capture_specializations
from tests.kernels.test_triton_quant_gemm import make_weight

launches = [("int4", 32, torch.bfloat16, 1, 6144, 4096, 8, False),
            ("q4_1", 64, torch.float16, 40, 1000, 4096, 1, True),
            ("int8", 32, torch.bfloat16, 2048, 4096, 14336, 1, False),
            ("q8_0", 64, torch.float32, 5, 576, 1536, 1, False)]
found = {}
with capture_specializations() as recorded:
    for fmt, group, dtype, rows, out_features, in_features, splits, bias in launches:
        packed = pack(make_weight(fmt, out_features, in_features, group))
        quantized_linear(torch.randn(rows, in_features).to(dtype), packed,
                         torch.randn(out_features).to(dtype) if bias else None, num_splits=splits)
        for spec in recorded:
            found.setdefault(spec.key, (f"{fmt} g{group} {dtype} rows={rows}", spec))
reports = [compile_spec(config, spec) for config, spec in found.values()]
print(json.dumps([dict(asdict(r), problems=r.problems()) for r in reports]))
"""


@pytest.mark.timeout(300)
@pytest.mark.skipif(not PTXAS.exists(), reason="Triton wheel without the NVIDIA backend (no ptxas)")
def test_gemm_compiles_for_sm90_without_spills() -> None:
    """What the GPU would run, compiled for sm_90 here: every tile config fits (no spills, <= 255
    registers, shared memory an A100 has) and stages its loads through cp.async."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(REPO_ROOT), TRITON_DEFAULT_FP_FUSION="1")
    done = subprocess.run([sys.executable, "-c", SM90_LAUNCHES], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = json.loads(done.stdout.strip().splitlines()[-1])
    gemms = [r for r in reports if r["kernel"] == "_quant_gemm_kernel"]
    assert len(gemms) == 4 and any(r["kernel"] == "_split_sum_kernel" for r in reports)
    assert all(r["problems"] == [] for r in reports), reports
    assert all(r["cp_async"] for r in gemms), gemms


def _dense_from_packed(packed: PackedQuantWeight) -> torch.Tensor:
    """The [out, in] levels the packed layout holds (int4: low nibble first)."""
    q = packed.qweight
    if packed.kind == "int4":
        q = torch.stack([q & 0xF, q >> 4], dim=3).reshape(q.shape[0], q.shape[1], -1)
    return q.transpose(0, 1).reshape(q.shape[1], -1)   # [groups, out, G] -> [out, in]


@pytest.mark.parametrize("fmt", FORMATS)
def test_pack_keeps_every_value(fmt: str) -> None:
    weight = make_weight(fmt, 24, 128, 64)
    packed = pack(weight)
    levels = weight.qweight if fmt in ("int8", "q8_0") else quant.unpack_int4(weight.qweight)
    assert torch.equal(_dense_from_packed(packed), levels)
    assert packed.shape == weight.shape and packed.group_size == 64
    assert torch.equal(packed.scales.float().t(), weight.scales)
    gguf_like = fmt in ("q8_0", "q4_1")   # fp16 scales: stored as fp16, exactly
    assert packed.scales.dtype == (torch.float16 if gguf_like else torch.float32)
    if fmt == "q4_1":
        assert packed.zero == 0 and torch.equal(packed.offsets.float().t(), weight.offsets)
    else:   # int8 has no offsets; symmetric int4's are -8 * scales: kept as zero = 8
        assert packed.offsets is None and packed.zero == (8 if fmt == "int4" else 0)
    assert packed.nbytes <= weight.nbytes
    assert packed.qweight.numel() * packed.qweight.element_size() == (
        weight.qweight.numel() * weight.qweight.element_size())


def test_prepare_weights_packs_only_the_quantized_projections() -> None:
    from engine_svc.weights import LayerWeights, ModelWeights

    plain = torch.randn(32, 64)
    quantized = make_weight("int4", 32, 64, 32)
    layer = LayerWeights(torch.ones(64), quantized, None, plain, torch.ones(64), plain, quantized)
    weights = ModelWeights(torch.randn(10, 64), [layer], torch.ones(64), plain)
    prepared = prepare_weights(weights)
    packed_layer = prepared.layers[0]
    assert isinstance(packed_layer.qkv_proj, PackedQuantWeight)
    assert isinstance(packed_layer.down_proj, PackedQuantWeight)
    assert packed_layer.o_proj is plain and prepared.lm_head is plain
    assert weights.layers[0].qkv_proj is quantized   # the caller's weights are left as they were
    all_plain = ModelWeights(weights.embed_tokens, [LayerWeights(
        torch.ones(64), plain, None, plain, torch.ones(64), plain, plain)], torch.ones(64), plain)
    assert prepare_weights(all_plain) is all_plain


# ---------------------------------------------------------------- the backend, on a tiny model


@pytest.fixture
def fresh_triton_modules() -> Iterator[None]:
    """get_ops("triton") imports kernels.triton.* in the mode set now (the interpreter on CPU):
    set aside copies imported earlier in another mode, and put them back afterwards."""
    keep = ("kernels.triton.launch", "kernels.triton._checks", "kernels.triton.quant_pack")
    saved = {name: sys.modules.pop(name) for name in list(sys.modules)
             if name.startswith("kernels.triton.") and name not in keep}
    yield
    for name in [n for n in sys.modules if n.startswith("kernels.triton.") and n not in keep]:
        del sys.modules[name]
    sys.modules.update(saved)


def _tiny_model(device: torch.device):
    """A 2-layer Llama-shaped model (with a QKV bias) whose projections and LM head are each of
    another quantized format, fp32, on `device`."""
    from engine_svc.model_config import ModelConfig
    from engine_svc.weights import LayerWeights, ModelWeights

    config = ModelConfig(model_type="qwen2", vocab_size=100, hidden_size=64, intermediate_size=96,
                         num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                         rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None,
                         max_position_embeddings=64, tie_word_embeddings=False,
                         attention_bias=True, eos_token_ids=[1], bos_token_id=0)

    def norm() -> torch.Tensor:
        return (1 + 0.1 * torch.randn(64)).to(device)

    layers = [LayerWeights(input_norm=norm(),
                           qkv_proj=make_weight("q8_0", 128, 64, 32).to(device),
                           qkv_bias=(0.1 * torch.randn(128)).to(device),
                           o_proj=make_weight("q4_1", 64, 64, 32).to(device),
                           post_norm=norm(),
                           gate_up_proj=make_weight("int4", 192, 64, 64).to(device),
                           down_proj=make_weight("int8", 64, 96, 32).to(device))
              for _ in range(config.num_layers)]
    weights = ModelWeights(embed_tokens=torch.randn(100, 64).to(device), layers=layers,
                           final_norm=norm(), lm_head=make_weight("int4", 100, 64, 32).to(device))
    return config, weights


def _steps(device: torch.device):
    """A prefill of two prompts (5 and 3 tokens), then one decode step of both."""
    from engine_svc.forward_batch import ForwardBatch

    def ints(values, dtype=torch.int64):
        return torch.tensor(values, dtype=dtype, device=device)

    prefill = ForwardBatch(input_ids=ints([5, 17, 42, 8, 99, 3, 61, 20]),
                           positions=ints([0, 1, 2, 3, 4, 0, 1, 2]),
                           out_rows=ints([0, 1, 2, 3, 4, 10, 11, 12]), slots=ints([0, 1], torch.int32),
                           logits_index=ints([4, 7]), num_decode=0,
                           seq_lens=ints([], torch.int32), max_seq_len=0,
                           prefix_lens=ints([0, 0], torch.int32),
                           cu_new_lens=ints([0, 5, 8], torch.int32), max_new_len=5)
    decode = ForwardBatch(input_ids=ints([7, 33]), positions=ints([5, 3]), out_rows=ints([5, 13]),
                          slots=ints([0, 1], torch.int32), logits_index=ints([0, 1]), num_decode=2,
                          seq_lens=ints([6, 4], torch.int32), max_seq_len=6,
                          prefix_lens=ints([], torch.int32), cu_new_lens=ints([0], torch.int32),
                          max_new_len=0)
    return prefill, decode


def _run(config, weights, ops, device: torch.device):
    """(the model built on `ops`, its logits [2, vocab] after each of _steps)."""
    from engine_svc.forward_batch import KVCache
    from engine_svc.models.llama import LlamaModel

    model = LlamaModel(config, weights, ops, max_positions=32)
    pool = (24, config.num_kv_heads, config.head_dim)
    table = torch.stack([torch.arange(8), torch.arange(10, 18)]).to(torch.int32).to(device)
    cache = KVCache(k=[torch.zeros(pool, device=device) for _ in range(config.num_layers)],
                    v=[torch.zeros(pool, device=device) for _ in range(config.num_layers)],
                    req_to_token=table)
    return model, [model.forward(batch, cache) for batch in _steps(device)]


def _oracle_linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(weight, quant.QuantizedWeight):
        return quant.quantized_linear(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


# get_ops("triton") imports the kernels afresh; in a process that imported Triton before
# TRITON_INTERPRET was set (the full suite) its driver lookup fails, so this test runs where the
# process started interpreted: test_subprocess_checks.py reruns this file that way
@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs a process started with TRITON_INTERPRET=1 (or CUDA); "
                           "test_subprocess_checks.py reruns it in one")
def test_triton_backend_runs_quantized_projections_like_the_torch_backend(
        device: torch.device, fresh_triton_modules: None) -> None:
    """The torch backend's ops with every projection through the oracle (its own CPU kernels
    may round scales or quantize activations) vs the Triton backend's packed GEMM."""
    from kernels.backend import get_ops

    config, weights = _tiny_model(device)
    torch_ops = dataclasses.replace(get_ops("torch"), prepare_weights=lambda w: w,
                                    model_linear=lambda w: _oracle_linear,
                                    layer_loop=lambda *args: None)
    _, expected = _run(config, weights, torch_ops, device)
    model, actual = _run(config, weights, get_ops("triton"), device)
    gemm = sys.modules["kernels.triton.quant_gemm"]
    assert model.linear is gemm.linear   # the quantized GEMM, not the oracle
    assert all(isinstance(w, PackedQuantWeight) for layer in model.weights.layers
               for w in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj))
    assert isinstance(model.weights.lm_head, PackedQuantWeight)
    for got, want in zip(actual, expected):   # prefill logits [2, vocab], then decode logits
        assert got.shape == want.shape == (2, config.vocab_size)
        torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-4,
                                   atol=1e-4 * float(want.abs().max()))
        assert torch.equal(got.argmax(dim=-1).cpu(), want.argmax(dim=-1).cpu())
