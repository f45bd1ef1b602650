"""The C kernels of the CPU path (kernels/cpu/csrc) against the torch code they replace."""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch
import torch.nn.functional as F

from kernels import reference
from kernels.cpu import native as cpu_native
from kernels.cpu import ops as cpu_ops
from tests.kernels.helpers import assert_close, make_pool_batch, naive_decode, naive_prefill

LIB = cpu_native.load()
needs_lib = pytest.mark.skipif(LIB is None, reason="no C compiler here: the SDPA path is used")
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture
def torch_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """cpu_ops without the C kernels (as on a machine with no compiler)."""
    monkeypatch.setitem(cpu_native._state, "lib", None)


@pytest.fixture
def torch_only_lib(monkeypatch: pytest.MonkeyPatch):
    """A context manager: cpu_ops without the C kernels inside it, with them after."""
    @contextlib.contextmanager
    def without_lib():
        monkeypatch.setitem(cpu_native._state, "lib", None)
        try:
            yield
        finally:
            monkeypatch.setitem(cpu_native._state, "lib", LIB)
    return without_lib


@needs_lib
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("hidden", [576, 100])   # 100: six vectors of 16 and a tail of 4
def test_rms_norm_equals_reference(dtype: torch.dtype, with_residual: bool, hidden: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(37, hidden, dtype=dtype) * 3
    residual = torch.randn(37, hidden, dtype=dtype) if with_residual else None
    weight = torch.randn(hidden, dtype=dtype)
    out, summed = cpu_native.rms_norm(LIB, x, weight, 1e-5, residual)
    ref_out, ref_summed = reference.rms_norm(x, weight, 1e-5, residual)
    assert torch.equal(summed, ref_summed)
    # bf16: the same roundings; only the fp32 sum of squares may differ in its last bits
    tol = dict(atol=0, rtol=0) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    mismatched = (out.float() - ref_out.float()).abs() > 0
    if dtype == torch.bfloat16:
        assert mismatched.float().mean() < 0.002
        torch.testing.assert_close(out, ref_out, atol=0.07, rtol=0.01)
    else:
        torch.testing.assert_close(out, ref_out, **tol)


@needs_lib
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_equals_torch_rotation_on_views(dtype: torch.dtype, monkeypatch) -> None:
    torch.manual_seed(2)
    qkv = torch.randn(19, (8 + 2 * 2) * 64, dtype=dtype)
    positions = torch.randint(0, 500, (19,))
    table = reference.build_rope_cache(64, 512, 10000.0, None, torch.device("cpu"))
    expected = qkv.clone()
    monkeypatch.setitem(cpu_native._state, "lib", None)
    cpu_ops.apply_rope(expected[:, :512].view(19, 8, 64), expected[:, 512:640].view(19, 2, 64),
                       positions, table)
    monkeypatch.setitem(cpu_native._state, "lib", LIB)
    cpu_ops.apply_rope(qkv[:, :512].view(19, 8, 64), qkv[:, 512:640].view(19, 2, 64),
                       positions, table)
    assert torch.equal(qkv, expected)


def _qkv_views(qkv: torch.Tensor, q_heads: int, kv_heads: int, head_dim: int):
    """q, k, v as the model has them: views of one [tokens, (q + 2 kv) * d] projection."""
    tokens, q_size, kv_size = qkv.shape[0], q_heads * head_dim, kv_heads * head_dim
    return (qkv[:, :q_size].view(tokens, q_heads, head_dim),
            qkv[:, q_size:q_size + kv_size].view(tokens, kv_heads, head_dim),
            qkv[:, q_size + kv_size:].view(tokens, kv_heads, head_dim))


@needs_lib
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 48])   # 48: a half of 24 = one vector and a tail
def test_rope_and_store_kv_equals_rope_then_store(dtype: torch.dtype, head_dim: int,
                                                  torch_only_lib) -> None:
    """The fused C pass gives exactly what the torch RoPE + index_copy give: q and k rotated
    in place, rotated k and unrotated v in the pool rows, other rows untouched."""
    torch.manual_seed(5)
    tokens, q_heads, kv_heads, capacity = 23, 6, 2, 64
    qkv = torch.randn(tokens, (q_heads + 2 * kv_heads) * head_dim, dtype=dtype)
    positions = torch.randint(0, 300, (tokens,))
    rows = torch.randperm(capacity)[:tokens]
    table = reference.build_rope_cache(head_dim, 512, 10000.0, None, torch.device("cpu"))
    k_pool, v_pool = (torch.randn(capacity, kv_heads, head_dim, dtype=dtype) for _ in range(2))
    want_qkv, want_k_pool, want_v_pool = qkv.clone(), k_pool.clone(), v_pool.clone()
    with torch_only_lib():
        cpu_ops.rope_and_store_kv(*_qkv_views(want_qkv, q_heads, kv_heads, head_dim), positions,
                                  table, want_k_pool, want_v_pool, rows)
    cpu_ops.rope_and_store_kv(*_qkv_views(qkv, q_heads, kv_heads, head_dim), positions, table,
                              k_pool, v_pool, rows)
    assert torch.equal(qkv, want_qkv)
    assert torch.equal(k_pool, want_k_pool) and torch.equal(v_pool, want_v_pool)


@needs_lib
@pytest.mark.parametrize("bad", ["row", "negative_row", "position"])
def test_rope_and_store_kv_rejects_out_of_range_before_writing(bad: str) -> None:
    torch.manual_seed(6)
    qkv = torch.randn(4, 8 * 64, dtype=torch.bfloat16)
    q, k, v = _qkv_views(qkv, 4, 2, 64)
    rows, positions = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 3])
    if bad == "row":
        rows[2] = 8
    elif bad == "negative_row":
        rows[1] = -1
    else:
        positions[3] = 16
    table = reference.build_rope_cache(64, 16, 10000.0, None, torch.device("cpu"))
    k_pool, v_pool = torch.zeros(8, 2, 64, dtype=torch.bfloat16), torch.zeros(8, 2, 64,
                                                                              dtype=torch.bfloat16)
    before = qkv.clone()
    match = "RoPE table" if bad == "position" else r"pool row is outside \[0, 8\)"
    with pytest.raises(IndexError, match=match):
        cpu_native.rope_store_kv(LIB, q, k, v, positions, table, k_pool, v_pool, rows)
    assert torch.equal(qkv, before)
    assert not k_pool.any() and not v_pool.any()


@needs_lib
@pytest.mark.parametrize("bad", ["slot", "negative_slot", "seq_len"])
def test_pool_attention_rejects_slots_and_lengths_outside_the_table(bad: str) -> None:
    """Checked in C before any key is read: a bad slot or length would read past the table."""
    pb = make_pool_batch([0] * 3, [4, 5, 6], 2, 64, torch.float32, torch.device("cpu"))
    slots, seq_lens = pb.slots.clone(), pb.seq_lens.clone()
    if bad == "slot":
        slots[1] = pb.req_to_token.shape[0]
    elif bad == "negative_slot":
        slots[0] = -1
    else:
        seq_lens[2] = pb.req_to_token.shape[1] + 1
    q = torch.randn(3, 4, 64)
    with pytest.raises(IndexError, match="outside"):
        cpu_native.pool_attention(LIB, q, pb.k_cache, pb.v_cache, pb.req_to_token, slots,
                                  seq_lens, 0.125)


@needs_lib
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("q_heads", "kv_heads", "head_dim"),
                         [(6, 2, 64), (4, 4, 128), (8, 1, 64), (10, 2, 128), (8, 1, 48),
                          (16, 1, 32), (12, 1, 64)])
@pytest.mark.parametrize("seq_lens", [[1, 9, 70, 3], [16, 300, 17, 33]])
def test_pool_attention_decode_matches_naive(dtype, q_heads, kv_heads, head_dim,
                                             seq_lens) -> None:
    """Groups 1-8 at head_dim 64/128 take the vector path (blocks of 16 keys, partial last
    block), the rest the generic one; seq_len 0 gives zeros."""
    torch.manual_seed(3)
    pb = make_pool_batch([0] * 4, seq_lens, kv_heads, head_dim, dtype, torch.device("cpu"))
    qkv = torch.randn(4, (q_heads + 2) * head_dim, dtype=dtype)
    q = qkv[:, :q_heads * head_dim].view(4, q_heads, head_dim)   # a strided view, as in the model
    out = cpu_native.pool_attention(LIB, q, pb.k_cache, pb.v_cache, pb.req_to_token, pb.slots,
                                    pb.seq_lens, head_dim ** -0.5)
    assert out.dtype == dtype
    assert_close(out, naive_decode(q, pb, head_dim ** -0.5), dtype)
    empty = cpu_native.pool_attention(LIB, q, pb.k_cache, pb.v_cache, pb.req_to_token, pb.slots,
                                      torch.zeros(4, dtype=torch.int32), 0.1)
    assert torch.equal(empty, torch.zeros_like(empty))


@needs_lib
def test_pool_attention_softmax_survives_large_and_tied_scores() -> None:
    """Scores far apart (terms under e^-80 of the peak vanish) and all-equal scores."""
    pb = make_pool_batch([0, 0], [40, 40], 1, 64, torch.float32, torch.device("cpu"))
    pb.k_cache.normal_().mul_(30.0)
    q = torch.randn(2, 2, 64) * 30.0
    out = cpu_native.pool_attention(LIB, q, pb.k_cache, pb.v_cache, pb.req_to_token, pb.slots,
                                    pb.seq_lens, 0.125)
    assert torch.isfinite(out).all()
    assert_close(out, naive_decode(q, pb, 0.125), torch.float32)
    pb.k_cache.zero_()
    out = cpu_native.pool_attention(LIB, q, pb.k_cache, pb.v_cache, pb.req_to_token, pb.slots,
                                    pb.seq_lens, 0.125)
    assert_close(out, naive_decode(q, pb, 0.125), torch.float32)


@needs_lib
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [1536, 37])
def test_silu_and_mul_equals_torch(dtype: torch.dtype, inter: int) -> None:
    """bf16: torch's roundings (silu rounded to bf16, then the product); fp32: within 2 ulp.
    37 leaves a partial vector at the end of each row; the input is a strided view."""
    torch.manual_seed(5)
    wide = torch.randn(33, 2 * inter + 8, dtype=dtype) * 4
    wide[0, :8] = torch.tensor([0.0, -0.0, 90.0, -90.0, 1e-3, -1e-3, 20.0, -20.0])
    x = wide[:, :2 * inter]
    out = cpu_native.silu_and_mul(LIB, x)
    expected = F.silu(x[:, :inter]) * x[:, inter:]
    assert out.shape == expected.shape and out.dtype == dtype
    if dtype == torch.bfloat16:   # an exp 1 ulp off may still flip a rounding, rarely
        assert ((out.float() - expected.float()).abs() > 0).float().mean() < 0.002
        torch.testing.assert_close(out, expected, atol=0.02, rtol=0.008)
    else:
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=3e-7)
    with pytest.raises(ValueError, match="unit last stride"):
        cpu_native.silu_and_mul(LIB, wide.t())


@needs_lib
def test_pool_attention_rejects_what_it_cannot_do() -> None:
    pb = make_pool_batch([0], [4], 1, 64, torch.float32, torch.device("cpu"))
    q = torch.randn(1, 32, 64)   # group 32 > 16
    assert not cpu_native.supports(q, pb.k_cache)
    with pytest.raises(RuntimeError, match="unsupported"):
        cpu_native.pool_attention(LIB, q, pb.k_cache, pb.v_cache, pb.req_to_token, pb.slots,
                                  pb.seq_lens, 0.1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_fallback_gives_the_same_model_ops(dtype: torch.dtype, torch_only) -> None:
    """Without the C kernels cpu_ops still computes attention (SDPA / grouped matmuls)."""
    torch.manual_seed(4)
    pb = make_pool_batch([0, 3], [5, 40], 2, 64, dtype, torch.device("cpu"))
    q = torch.randn(2, 6, 64, dtype=dtype)
    out = cpu_ops.decode_attention(q, pb.k_cache, pb.v_cache, pb.req_to_token, pb.slots,
                                   pb.seq_lens, 0.125, 43)
    assert_close(out, naive_decode(q, pb, 0.125), dtype)
    qp = torch.randn(45, 6, 64, dtype=dtype)
    out = cpu_ops.prefill_attention(qp, pb.k_cache, pb.v_cache, pb.req_to_token, pb.slots,
                                    pb.prefix_lens, pb.cu_new_lens, 40, 0.125)
    assert_close(out, naive_prefill(qp, pb, 0.125), dtype)
    x = torch.randn(3, 64, dtype=dtype)
    w = torch.randn(64, dtype=dtype)
    assert torch.equal(cpu_ops.rms_norm(x, w, 1e-6)[0], reference.rms_norm(x, w, 1e-6)[0])


def test_build_is_cached_and_a_broken_compiler_falls_back(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("LLMSERVE_CACHE_DIR", str(tmp_path))
    if cpu_native._compiler() is not None:
        first = cpu_native.build()
        stamp = first.stat().st_mtime_ns
        assert cpu_native.build() == first and first.stat().st_mtime_ns == stamp
        assert first.parent == tmp_path / "native"
    monkeypatch.setenv("CC", "false")
    monkeypatch.setenv("LLMSERVE_CACHE_DIR", str(tmp_path / "other"))
    monkeypatch.delitem(cpu_native._state, "lib", raising=False)
    with caplog.at_level(logging.WARNING, logger="kernels.cpu.native"):
        assert cpu_native.load() is None
    assert "unavailable" in caplog.text
    monkeypatch.setenv("LLMSERVE_NATIVE", "0")
    monkeypatch.delitem(cpu_native._state, "lib")
    assert cpu_native.load() is None


def test_loading_the_library_keeps_subnormal_floats() -> None:
    """A -ffast-math build would set flush-to-zero for the whole process (torch included)."""
    import sys

    cpu_native.load()
    tiny = sys.float_info.min / 4
    assert tiny > 0.0
    assert torch.tensor([1e-40], dtype=torch.float32).mul(1.0).item() != 0.0


@needs_lib
def test_argmax_rows_equals_torch_on_ties_nan_and_strided_rows() -> None:
    torch.manual_seed(6)
    wide = torch.randn(9, 1000)
    x = wide[:, :997]   # rows 1000 apart, 997 = 62 vectors + 5 left over
    x[1, 10] = x[1, 500] = x[1].max() + 1.0   # tie: the first wins
    x[2, 996] = 50.0                          # maximum in the leftover tail
    x[3, 7] = float("nan")                    # NaN counts as the maximum, as in torch
    x[3, 700] = float("nan")
    x[4].fill_(-float("inf"))
    x[5, 0] = 1e30
    x[6].fill_(0.0)
    x[6, 3] = -0.0
    assert torch.equal(cpu_native.argmax_rows(LIB, x), x.argmax(dim=-1))
    assert torch.equal(cpu_ops.argmax_rows(x), x.argmax(dim=-1))
    with pytest.raises(ValueError, match="float32"):
        cpu_native.argmax_rows(LIB, x.double())


CPUINFO = ("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Gold 6430\n"
           "flags\t\t: fpu avx512f avx512_bf16 amx_tile amx_bf16\nbugs\t\t: spectre_v1\n\n"
           "processor\t: 1\nmodel name\t: another\nflags\t\t: fpu\n")


def test_cpuinfo_gives_the_first_processors_model_and_flags() -> None:
    info = cpu_native.parse_cpuinfo(CPUINFO)
    assert info.model == "Intel(R) Xeon(R) Gold 6430" and info.readable
    assert info.flags_text == "fpu avx512f avx512_bf16 amx_tile amx_bf16"
    assert info.flags == frozenset({"fpu", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"})
    bare = cpu_native.parse_cpuinfo("processor\t: 0\nFeatures\t: fp asimd\n")   # as on aarch64
    assert (bare.model, bare.flags_text, bare.flags) == ("", "", frozenset())


def test_the_build_key_follows_the_cpu_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    signatures = []
    for info in (cpu_native.CpuInfo("x", "avx2 fma", True),
                 cpu_native.CpuInfo("x", "avx2 fma avx512f", True),
                 cpu_native.CpuInfo("", "", False)):
        monkeypatch.setattr(cpu_native, "cpu_info", lambda info=info: info)
        signatures.append(cpu_native._cpu_signature())
    assert signatures[0] == "avx2 fma" and signatures[0] != signatures[1]
    assert cpu_native.cpu_flags() == frozenset()   # unreadable: no flags, the processor's name
    assert signatures[2] == cpu_native.platform.processor()
