"""The per-shape GEMM choice (kernels/cpu/gemm_choice.py): the selection logic on injected
timings, the cache, and that both implementations behind `chosen_linear` give the product."""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from kernels.cpu import gemm_choice as gc
from kernels.cpu import linear as cpu_linear
from kernels.cpu import native
from kernels.cpu import quant_linear
from kernels.quant import quantize

needs_both = pytest.mark.skipif(
    not (cpu_linear.native_available()
         and cpu_linear.can_prepack(torch.zeros(1, 1, dtype=torch.bfloat16))),
    reason="needs the AVX512-BF16 C kernel and oneDNN's bf16 linear")


def test_rows_map_to_the_nearest_bucket_on_a_log_scale() -> None:
    assert gc.BUCKET_ROWS == (1, 8, 32, 256, 2048)
    expected = {1: 0, 2: 0, 3: 1, 8: 1, 15: 1, 16: 2, 32: 2, 90: 2, 91: 3, 256: 3, 724: 3,
                725: 4, 2048: 4, 10**6: 4}
    assert {rows: gc.bucket_index(rows) for rows in expected} == expected


def test_decide_keeps_the_c_kernel_unless_onednn_wins_by_the_margin() -> None:
    assert gc.decide([1.0] * 5, [0.5] * 5) == gc.ONEDNN
    assert gc.decide([1.0] * 5, [0.97] * 5) == gc.NATIVE        # inside the 5% margin
    assert gc.decide([1.0] * 5, [1.5] * 5) == gc.NATIVE
    # one wild run each way does not decide: medians of pairs and of each side
    assert gc.decide([1.0, 1.0, 9.0, 1.0, 1.0], [0.5, 0.5, 0.5, 9.0, 0.5]) == gc.ONEDNN
    assert gc.decide([1.0, 1.0, 1.0], [0.5, 2.0, 2.0]) == gc.NATIVE
    # the paired ratios and the ratio of the medians must agree
    assert gc.decide([1.0, 2.0, 3.0], [0.9, 1.9, 2.8]) == gc.NATIVE
    assert gc.decide([], []) == gc.NATIVE
    assert gc.decide([1.0], [0.5, 0.5]) == gc.NATIVE


def test_rotation_spills_the_cache_when_memory_bound_and_not_beyond() -> None:
    mib = 1 << 20
    # a 1 MiB weight, 32 MiB cache: 64 distinct weights wanted, 30 layers there
    assert gc.rotation(30, 512, 1024, 1, 32 * mib) == 30
    assert gc.rotation(100, 512, 1024, 32, 32 * mib) == 64
    assert gc.rotation(100, 512, 1024, 256, 32 * mib) == 1
    assert gc.rotation(1, 512, 1024, 2048, 32 * mib) == 1


class FakeClock:
    """A clock the fake runners advance: the 'time' of a run is what it adds."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _fake_shape(clock: FakeClock, name: str, native_cost, onednn_cost, layers: int = 4,
                max_rows: int = 2048, calls: list | None = None) -> gc.ShapeCandidates:
    def runner(cost, impl):
        def run(x, i):
            clock.now += cost(x)
            if calls is not None:
                calls.append((impl, x, i))
        return run

    return gc.ShapeCandidates(name, 64, 32, layers, runner(native_cost, "native"),
                              runner(onednn_cost, "onednn"), make_x=lambda rows: rows,
                              max_rows=max_rows)


def test_measure_shape_picks_per_bucket_from_injected_costs() -> None:
    clock, calls = FakeClock(), []
    # C: 1 ms per row; oneDNN: 20 ms fixed + 0.1 ms per row -> C up to 8 rows, oneDNN from 32
    shape = _fake_shape(clock, "qkv", lambda rows: 1e-3 * rows,
                        lambda rows: 20e-3 + 1e-4 * rows, calls=calls)
    result = gc.measure_shape(shape, cache_bytes=1 << 20, clock=clock)
    assert result.choices() == [gc.NATIVE, gc.NATIVE, gc.ONEDNN, gc.ONEDNN, gc.ONEDNN]
    one_row = result.buckets[0]
    assert one_row.native_s == pytest.approx([1e-3] * 5)     # per call: divided by the rotation
    assert one_row.onednn_s == pytest.approx([20.1e-3] * 5)
    assert not any(b.noisy() for b in result.buckets)
    # memory-bound buckets rotate over all 4 layers, compute-bound ones take one
    assert {i for impl, rows, i in calls if rows == 1} == {0, 1, 2, 3}
    assert {i for impl, rows, i in calls if rows == 2048} == {0}
    # alternating a, b after one warm-up each, 5 repeats at 1 row
    assert [impl for impl, rows, i in calls if rows == 1 and i == 0] == ["native", "onednn"] * 6


def test_lm_head_takes_its_256_row_choice_at_2048_untimed() -> None:
    clock, calls = FakeClock(), []
    shape = _fake_shape(clock, "lm_head", lambda rows: 1e-3 * rows, lambda rows: 1e-4 * rows,
                        layers=1, max_rows=gc.LM_HEAD_MAX_ROWS, calls=calls)
    result = gc.measure_shape(shape, cache_bytes=1 << 20, clock=clock)
    assert result.choices() == [gc.ONEDNN] * 5
    assert not result.buckets[-1].measured and result.buckets[-2].measured
    assert max(rows for _, rows, _ in calls) == 256


def test_noisy_runs_take_the_prior_not_the_timing() -> None:
    clock = FakeClock()

    def spread_out(base: float):
        factors = iter([1.0, 2.0, 2.0] * 20)   # runs at 1x and 2x: every bucket noisy
        return lambda rows: base * next(factors)

    for amx, expected in ((False, [gc.NATIVE] * 5),
                          (True, [gc.NATIVE, gc.NATIVE, gc.ONEDNN, gc.ONEDNN, gc.ONEDNN])):
        # oneDNN looks 3x faster (or slower) on noisy runs: the prior decides either way
        for ratio in (0.3, 3.0):
            shape = _fake_shape(clock, "qkv", spread_out(1e-3), spread_out(ratio * 1e-3),
                                layers=1)
            result = gc.measure_shape(shape, cache_bytes=1, clock=clock, amx=amx)
            assert all(b.noisy() and b.prior for b in result.buckets)
            assert result.choices() == expected, (amx, ratio)
    # quiet runs: the timing decides, whatever the prior
    shape = _fake_shape(clock, "qkv", lambda rows: 1e-3, lambda rows: 0.85e-3, layers=1)
    result = gc.measure_shape(shape, cache_bytes=1, clock=clock, amx=False)
    assert result.choices() == [gc.ONEDNN] * 5 and not any(b.prior for b in result.buckets)


def test_a_spread_of_runs_marks_the_bucket_noisy() -> None:
    timing = gc.BucketTiming(1, [1.0, 1.0, 1.6, 1.7, 1.8], [1.0] * 5)
    assert timing.noisy()
    assert not gc.BucketTiming(1, [1.0, 1.1, 1.2, 1.2, 3.0], [1.0] * 5).noisy()
    assert not gc.BucketTiming(1, [1.0, 1.6, 1.7, 1.8, 1.9], [1.0] * 5, measured=False).noisy()


def _candidates(clock: FakeClock, onednn_cost) -> list[gc.ShapeCandidates]:
    return [_fake_shape(clock, "qkv", lambda rows: 1e-3 * rows, onednn_cost),
            _fake_shape(clock, "lm_head", lambda rows: 1e-3 * rows, onednn_cost, layers=1,
                        max_rows=gc.LM_HEAD_MAX_ROWS)]


def test_choose_caches_per_identity_and_reads_it_back(tmp_path, monkeypatch) -> None:
    clock = FakeClock()

    def choose(candidates, identity):
        return gc.choose(candidates, identity, tmp_path, cache_bytes=1 << 20, clock=clock)

    identity = {"cpu_model": "test cpu", "shapes": {"qkv": [64, 32]}}
    first = choose(_candidates(clock, lambda rows: 1e-4 * rows), identity)
    assert first.source == "measured" and first.uses_onednn("qkv")
    assert len(list(tmp_path.glob("*.json"))) == 1

    def explode(rows):
        raise AssertionError("measured again instead of reading the cache")

    cached = choose(_candidates(clock, explode), identity)
    assert cached.source == "cached"
    assert {n: s.choices() for n, s in cached.shapes.items()} == \
        {n: s.choices() for n, s in first.shapes.items()}
    assert "oneDNN" in gc.format_table(cached) and "as 256" in gc.format_table(cached)
    # another identity (another CPU, thread count, shapes ...) measures anew
    slow_onednn = _candidates(clock, lambda rows: 1e-2 * rows)
    other = choose(slow_onednn, {**identity, "threads": 3})
    assert other.source == "measured" and not other.uses_onednn("qkv")
    monkeypatch.setenv("LLMSERVE_GEMM_CACHE", "0")
    assert choose(slow_onednn, identity).source == "measured"


def test_noisy_timings_are_cached_for_an_hour_only(tmp_path) -> None:
    clock = FakeClock()
    costs = iter([1e-3, 5e-3] * 1000)   # every other run 5x slower: a busy machine
    table = gc.choose(_candidates(clock, lambda rows: next(costs)), {"cpu_model": "x"},
                      tmp_path, cache_bytes=1 << 20, clock=clock)
    assert table.noisy() and table.source == "measured"
    stored = list(tmp_path.glob("*.json"))   # kept for an hour only
    assert len(stored) == 1 and gc.load_cached(stored[0], ["qkv"]) is not None
    later = time.time() + gc.PROVISIONAL_TTL_S + 1
    assert gc.load_cached(stored[0], ["qkv"], now=later) is None


def test_timing_stops_at_its_budget_bucket_by_bucket_and_is_provisional(tmp_path) -> None:
    clock, calls = FakeClock(), []
    shapes = [_fake_shape(clock, name, lambda rows: 1e-3 * rows, lambda rows: 1e-4 * rows,
                          calls=calls) for name in ("qkv", "down")]
    # 1 row: 6 runs each x 4 layers x (1 + 0.1) ms = 26 ms per shape, 8 rows 211 ms: the 0.3 s
    # budget ends after the 8-row bucket
    table = gc.choose(shapes, {"cpu_model": "x"}, tmp_path, cache_bytes=1 << 20, clock=clock,
                      budget_s=0.3, amx=False)
    assert table.truncated() and table.provisional()
    stored = list(tmp_path.glob("*.json"))
    assert gc.load_cached(stored[0], ["qkv"], now=time.time() + gc.PROVISIONAL_TTL_S + 1) is None
    for shape in table.shapes.values():
        assert [b.measured for b in shape.buckets] == [True, True, False, False, False]
    # the bucket running when the budget ran out stopped after its first pair of runs and
    # took the prior (the C kernel without AMX), as the untimed ones did
    qkv, down = table.shapes["qkv"], table.shapes["down"]
    assert len(qkv.buckets[1].native_s) == 5 and len(down.buckets[1].native_s) == 1
    assert qkv.choices() == [gc.ONEDNN, gc.ONEDNN, gc.NATIVE, gc.NATIVE, gc.NATIVE]
    assert down.choices() == [gc.ONEDNN, gc.NATIVE, gc.NATIVE, gc.NATIVE, gc.NATIVE]
    assert [b.prior for b in down.buckets] == [False, True, True, True, True]
    assert "untimed" in gc.format_table(table) and "C* untimed" in gc.format_table(table)
    # with AMX the untimed buckets from 32 rows take oneDNN
    amx_table = gc.choose(shapes, {"cpu_model": "amx"}, tmp_path, cache_bytes=1 << 20,
                          clock=clock, budget_s=0.3, amx=True)
    assert amx_table.shapes["down"].choices()[2:] == [gc.ONEDNN] * 3
    # smallest bucket first across shapes: both shapes at 1 row before either at 8
    order = [(x, impl) for impl, x, i in calls if i == 0]
    first_8 = next(n for n, (rows, _) in enumerate(order) if rows == 8)
    assert {rows for rows, _ in order[:first_8]} == {1} and len(order) > first_8


def test_a_broken_cache_file_is_measured_over(tmp_path) -> None:
    clock = FakeClock()
    identity = {"cpu_model": "x"}
    path = tmp_path / f"{gc.cache_key(identity)}.json"
    path.write_text("{not json")
    table = gc.choose(_candidates(clock, lambda rows: 1e-4), identity, tmp_path,
                      cache_bytes=1, clock=clock, budget_s=1e9)
    assert table.source == "measured"
    assert gc.load_cached(path, ["qkv", "lm_head"]) is not None
    assert gc.load_cached(path, ["qkv", "down"]) is None   # a shape it does not hold
    # a clean measurement is kept for good
    assert gc.load_cached(path, ["qkv"], now=time.time() + 100 * gc.PROVISIONAL_TTL_S)


def _exact(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    exact = x.double() @ weight.double().T
    return exact + bias.double() if bias is not None else exact


@needs_both
@pytest.mark.parametrize("out_features, in_features", [(16, 2), (48, 40), (80, 1538), (112, 96)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chosen_linear_runs_the_picked_gemm_and_both_give_the_product(
        out_features, in_features, with_bias) -> None:
    torch.manual_seed(out_features + in_features)
    weight = torch.randn(out_features, in_features, dtype=torch.bfloat16)
    bias = torch.randn(out_features, dtype=torch.bfloat16) if with_bias else None
    packed = cpu_linear.pack_native(weight)
    use = (False, True, False, True, True)   # oneDNN at 8, 256 and 2048 rows
    setattr(packed, cpu_linear.PLAN_ATTR,
            cpu_linear.ProjectionPlan(cpu_linear.prepack(weight), use))
    assert cpu_linear.linear_for(packed) is cpu_linear.chosen_linear
    for rows in (1, 3, 7, 13, 33, 91, 300, 725):
        x = torch.randn(rows, in_features, dtype=torch.bfloat16)
        y = cpu_linear.chosen_linear(x, packed, bias)
        assert y.shape == (rows, out_features) and y.dtype == torch.bfloat16
        scale = _exact(x.abs(), weight.abs(), bias.abs() if bias is not None else None)
        error = (y.double() - _exact(x, weight, bias)).abs()
        assert (error <= scale.clamp(min=1.0) * 2.0**-8).all()
        if use[gc.bucket_index(rows)]:   # oneDNN: F.linear's numbers bit for bit
            assert torch.equal(y, F.linear(x, weight, bias))
        else:                            # the C kernel's
            assert torch.equal(y, cpu_linear.native_linear(x, packed, bias))


@dataclass
class _Layer:
    input_norm: torch.Tensor
    qkv_proj: torch.Tensor
    qkv_bias: torch.Tensor | None
    o_proj: torch.Tensor
    post_norm: torch.Tensor
    gate_up_proj: torch.Tensor
    down_proj: torch.Tensor


@dataclass
class _Weights:
    layers: list
    lm_head: torch.Tensor


def _tiny_weights(layers: int = 2) -> _Weights:
    def w(out_features, in_features):
        return torch.randn(out_features, in_features, dtype=torch.bfloat16)

    norm = torch.ones(32, dtype=torch.bfloat16)
    return _Weights([_Layer(norm, w(64, 32), None, w(32, 32), norm, w(96, 32), w(32, 48))
                     for _ in range(layers)], w(80, 32))


def _table(onednn_shapes: set[str]) -> gc.GemmTable:
    shapes = {}
    for name in ("qkv", "o", "gate_up", "down", "lm_head"):
        pick = [gc.NATIVE, gc.NATIVE, gc.ONEDNN, gc.ONEDNN, gc.ONEDNN] \
            if name in onednn_shapes else [gc.NATIVE] * 5
        shapes[name] = gc.ShapeChoice(name, 1, 1, [gc.BucketTiming(r, [1.0], [1.0], p)
                                                   for r, p in zip(gc.BUCKET_ROWS, pick)])
    return gc.GemmTable(shapes, source="measured")


@needs_both
def test_prepare_weights_twins_only_the_shapes_that_pick_onednn(monkeypatch) -> None:
    monkeypatch.delenv("LLMSERVE_CPU_GEMM", raising=False)
    seen = []

    def fake_choose(candidates, identity, cache_dir, cache_bytes=None):
        seen.append(sorted(c.name for c in candidates))
        return _table({"gate_up", "lm_head"})

    monkeypatch.setattr(gc, "choose", fake_choose)
    packed = cpu_linear.prepare_weights(_tiny_weights())
    assert seen == [["down", "gate_up", "lm_head", "o", "qkv"]]
    assert cpu_linear.linear_for(packed.lm_head) is cpu_linear.chosen_linear
    for layer in packed.layers:
        plan = cpu_linear.plan_of(layer.qkv_proj)   # a plan without a twin: C at every bucket
        assert layer.qkv_proj.dim() == 3 and plan.onednn is None and not any(plan.use_onednn)
        plan = cpu_linear.plan_of(layer.gate_up_proj)
        assert plan is not None and plan.onednn.is_mkldnn
        assert [plan.picks_onednn(r) for r in (1, 8, 32, 2048)] == [False, False, True, True]
    # the C kernel wins everywhere: no plans, the plain C product
    monkeypatch.setattr(gc, "choose", lambda *args, **kwargs: _table(set()))
    packed = cpu_linear.prepare_weights(_tiny_weights())
    assert cpu_linear.linear_for(packed.lm_head) is cpu_linear.native_linear
    assert cpu_linear.plan_of(packed.layers[0].down_proj) is None
    # LLMSERVE_CPU_GEMM=native / onednn: nothing measured, one packing
    monkeypatch.setattr(gc, "choose", fake_choose)
    monkeypatch.setenv("LLMSERVE_CPU_GEMM", "native")
    packed = cpu_linear.prepare_weights(_tiny_weights())
    assert len(seen) == 1 and cpu_linear.linear_for(packed.lm_head) is cpu_linear.native_linear
    monkeypatch.setenv("LLMSERVE_CPU_GEMM", "onednn")
    assert cpu_linear.prepare_weights(_tiny_weights()).lm_head.is_mkldnn and len(seen) == 1


@needs_both
def test_prepare_weights_measures_real_kernels(tmp_path, monkeypatch) -> None:
    """The real timing path on small shapes: a table for all five shapes, cached, logged."""
    monkeypatch.delenv("LLMSERVE_CPU_GEMM", raising=False)
    monkeypatch.setenv("LLMSERVE_CACHE_DIR", str(tmp_path))
    torch.manual_seed(1)
    weights = _tiny_weights()
    packed = cpu_linear.prepare_weights(weights)
    files = list((tmp_path / "gemm_choice").glob("*.json"))
    assert len(files) == 1   # provisional (an hour) when the machine was too busy
    for name, proj in (("qkv_proj", 0), ("down_proj", 1)):
        x = torch.randn(40, 32 if proj == 0 else 48, dtype=torch.bfloat16)
        fn = cpu_linear.linear_for(packed.lm_head)
        y = fn(x, getattr(packed.layers[0], name), None)
        exact = x.double() @ getattr(weights.layers[0], name).double().T
        assert ((y.double() - exact).abs() <= (x.double().abs() @ getattr(
            weights.layers[0], name).double().abs().T).clamp(min=1.0) * 2.0**-8).all()


def test_labels_name_the_incumbent_and_the_challenger() -> None:
    labels = gc.QUANT_LABELS
    assert gc.decide([1.0] * 5, [0.5] * 5, labels=labels) == gc.DEQUANT
    assert gc.decide([1.0] * 5, [0.97] * 5, labels=labels) == gc.QUANT
    assert gc.prior_choice(256, amx=True, labels=labels) == gc.DEQUANT
    assert gc.prior_choice(256, amx=False, labels=labels) == gc.QUANT
    # a quantized weight's smaller bytes: more distinct weights to spill the cache
    assert gc.rotation(100, 512, 1024, 1, 32 << 20, bytes_per_weight=0.5) == 100
    assert gc.rotation(100, 512, 1024, 1, 32 << 20, bytes_per_weight=2.0) == 64


def test_quantized_shapes_are_measured_cached_and_shown_with_their_labels(tmp_path) -> None:
    clock = FakeClock()
    # VNNI 1 ms per row; dequantized: 10 ms + 0.1 ms per row -> VNNI up to 8 rows
    shape = _fake_shape(clock, "gate_up", lambda rows: 1e-3 * rows,
                        lambda rows: 10e-3 + 1e-4 * rows)
    shape.labels = gc.QUANT_LABELS
    table = gc.choose([shape], {"cpu_model": "q"}, tmp_path, cache_bytes=1 << 20, clock=clock,
                      budget_s=1e9)
    want = [gc.QUANT, gc.QUANT, gc.DEQUANT, gc.DEQUANT, gc.DEQUANT]
    assert table.shapes["gate_up"].choices() == want and not table.uses_onednn("gate_up")
    cached = gc.load_cached(next(tmp_path.glob("*.json")), ["gate_up"])
    assert cached.shapes["gate_up"].choices() == want
    assert cached.shapes["gate_up"].labels == gc.QUANT_LABELS
    assert "VNNI" in gc.format_table(cached) and "deq" in gc.format_table(cached)


needs_quant = pytest.mark.skipif(
    not (cpu_linear.native_available() and quant_linear.vnni_available()),
    reason="needs the AVX512-BF16 and VNNI C kernels")


@needs_quant
def test_prepare_weights_gives_quantized_shapes_their_measured_routes(monkeypatch) -> None:
    monkeypatch.delenv("LLMSERVE_CPU_GEMM", raising=False)
    seen = {}

    def fake_choose(candidates, identity, cache_dir, cache_bytes=None):
        seen.update({c.name: c.labels for c in candidates})
        shapes = {c.name: gc.ShapeChoice(c.name, 1, 1, [gc.BucketTiming(
            r, [1.0], [1.0], c.labels[int(r >= 32)]) for r in gc.BUCKET_ROWS], c.labels)
            for c in candidates}
        return gc.GemmTable(shapes, source="measured")

    monkeypatch.setattr(gc, "choose", fake_choose)
    def q(out_features, in_features):
        return quantize(torch.randn(out_features, in_features), "int4", 32)

    norm = torch.ones(32, dtype=torch.bfloat16)   # int4 layers, bf16 LM head
    weights = _Weights([_Layer(norm, q(64, 32), None, q(32, 32), norm, q(96, 32), q(32, 64))
                        for _ in range(2)], torch.randn(80, 32, dtype=torch.bfloat16))
    packed = cpu_linear.prepare_weights(weights)
    assert seen == {"qkv": gc.QUANT_LABELS, "o": gc.QUANT_LABELS, "gate_up": gc.QUANT_LABELS,
                    "down": gc.QUANT_LABELS, "lm_head": gc.BF16_LABELS}
    dequant = quant_linear.dequant_route()
    for layer in packed.layers:
        assert layer.down_proj.routes == ("vnni", "vnni", dequant, dequant, dequant)
    x = torch.randn(40, 32, dtype=torch.bfloat16)   # 32-row bucket: the dequantized route
    y = cpu_linear.model_linear(packed)(x, packed.layers[0].qkv_proj, None)
    assert torch.equal(y, quant_linear._ROUTE_FNS[dequant](x, packed.layers[0].qkv_proj))
    assert cpu_linear.plan_of(packed.lm_head).onednn is not None   # oneDNN from 32 rows


def test_amx_and_the_cache_identity_read_native_cpu_info(monkeypatch: pytest.MonkeyPatch) -> None:
    """AMX needs amx_tile and amx_bf16; the identity hashes the flags text as listed (the key
    of tables cached before the one cpuinfo reader)."""
    flags = "avx512f avx512_bf16 amx_tile amx_bf16"
    monkeypatch.setattr(native, "cpu_info", lambda: native.CpuInfo("Xeon", flags, True))
    assert gc.cpu_has_amx()
    assert gc.cpu_identity() == {"cpu_model": "Xeon",
                                 "cpu_flags_sha": hashlib.sha256(flags.encode()).hexdigest()[:16]}
    monkeypatch.setattr(native, "cpu_info", lambda: native.CpuInfo("", "avx512f amx_tile", True))
    assert not gc.cpu_has_amx() and gc.cpu_identity()["cpu_model"] == "unknown"
    monkeypatch.setattr(native, "cpu_info", lambda: native.CpuInfo("", "", False))
    assert not gc.cpu_has_amx()
    assert gc.cpu_identity()["cpu_flags_sha"] == hashlib.sha256(b"").hexdigest()[:16]
