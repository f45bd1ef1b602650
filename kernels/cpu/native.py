"""Small C kernels for the CPU path: attention over the KV pool, RMSNorm, RoPE, bf16 and
weight-only int8/int4 projections (kernels/cpu/csrc).

Built on first use with the system C compiler (`cc -O3 -march=native -fopenmp`) into a cache
directory keyed by the source, the flags and this CPU, then loaded with ctypes. Its OpenMP calls
bind to the libgomp torch already loaded, so it runs on torch's threads. Where there is no
compiler (or LLMSERVE_NATIVE=0), `load()` returns None and callers use the SDPA path.

    python -m kernels.cpu.native      # build now (make setup does) and print where it went
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCES = [CSRC / name for name in (
    "pool_attention.c", "prefill_blocks.c", "elementwise.c", "gemm_bf16.c", "gemm_quant.c",
    "forward_layers.c")]
HEADERS = [CSRC / name for name in ("vec16.h", "kernels.h", "pool_attention.h")]
# vector sums need reassociation (-fassociative-math and the two flags it requires); not
# -ffast-math: gcc then links crtfastmath.o, which turns on flush-to-zero for the whole process.
# No contraction into FMAs: the bf16 rounding steps must match torch's.
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fno-math-errno",
         "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math", "-ffp-contract=off",
         "-fopenmp", "-shared", "-fPIC", "-std=c11"]
MAX_GROUP, MAX_HEAD_DIM = 16, 256   # as in the C source
_DTYPES = {torch.bfloat16: 1, torch.float32: 0}
_state: dict[str, object] = {}


def cache_dir() -> Path:
    """LLMSERVE_CACHE_DIR, else $XDG_CACHE_HOME/llmserve, else ~/.cache/llmserve."""
    root = os.environ.get("LLMSERVE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llmserve")
    return Path(root) / "native"


@dataclass(frozen=True, slots=True)
class CpuInfo:
    """The first processor's model name and feature flags as /proc/cpuinfo lists them."""

    model: str         # its "model name" entry ("" when absent)
    flags_text: str    # its "flags" entry as listed, space-separated ("" when absent)
    readable: bool     # False: /proc/cpuinfo could not be read (then both are "")

    @property
    def flags(self) -> frozenset[str]:
        """The feature flags as a set ("avx512_bf16", "amx_tile", ...)."""
        return frozenset(self.flags_text.split())


def parse_cpuinfo(text: str) -> CpuInfo:
    """The first "model name" and "flags" entries of /proc/cpuinfo's text."""
    model: str | None = None
    flags: str | None = None
    for line in text.splitlines():
        name, colon, value = line.partition(":")
        if not colon:
            continue
        if model is None and name.startswith("model name"):
            model = value.strip()
        elif flags is None and name.startswith("flags"):
            flags = value.strip()
        if model is not None and flags is not None:
            break
    return CpuInfo(model or "", flags or "", readable=True)


@functools.cache
def cpu_info() -> CpuInfo:
    """This CPU's model name and flags from /proc/cpuinfo, read once per process (the one
    reader of that file for kernels/cpu: the build key here, gemm_choice's AMX test and its
    cache identity)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return CpuInfo("", "", readable=False)
    return parse_cpuinfo(text)


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags from /proc/cpuinfo (empty when unreadable)."""
    return cpu_info().flags


def _cpu_signature() -> str:
    info = cpu_info()
    return info.flags_text if info.readable else platform.processor()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build(compiler: str | None = None) -> Path:
    """Compile the kernel (unless a build for this source/flags/CPU exists); returns the .so."""
    compiler = compiler or _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    key = hashlib.sha256(b"\0".join([*(source.read_bytes() for source in SOURCES + HEADERS),
                                      " ".join(FLAGS).encode(), compiler.encode(),
                                      _cpu_signature().encode()])).hexdigest()
    target = cache_dir() / f"llmserve_cpu-{key[:16]}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        result = subprocess.run([compiler, *FLAGS, "-o", str(built), *map(str, SOURCES), "-lm"],
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed on kernels/cpu/csrc:\n{result.stderr[-2000:]}")
        os.replace(built, target)   # atomic: concurrent builders agree on the result
    return target


def load() -> ctypes.CDLL | None:
    """The built library, or None (logged once) where it cannot be built or is disabled."""
    if "lib" in _state:
        return _state["lib"]  # type: ignore[return-value]
    lib = None
    if os.environ.get("LLMSERVE_NATIVE", "1") == "0":
        log.info("native CPU attention disabled by LLMSERVE_NATIVE=0; using SDPA")
    elif not sys.platform.startswith("linux"):
        log.info("native CPU attention is built on Linux only; using SDPA")
    else:
        try:
            lib = ctypes.CDLL(str(build()))
            _declare(lib)
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            log.warning("native CPU attention unavailable (%s); using SDPA", error)
            lib = None
    _state["lib"] = lib
    return lib


class _NewQKV(ctypes.Structure):
    """new_qkv in csrc/kernels.h: one step's q, k, v views (strides in elements)."""

    _fields_ = [("q", ctypes.c_void_p), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p)] + [
        (name, ctypes.c_int64) for name in (
            "q_token_stride", "q_head_stride", "k_token_stride", "k_head_stride",
            "v_token_stride", "v_head_stride", "tokens", "q_heads", "kv_heads", "head_dim")]


class _PoolRows(ctypes.Structure):
    """pool_rows in csrc/kernels.h: the K/V pool and the rows receiving the new tokens."""

    _fields_ = [("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p),
                ("row_stride", ctypes.c_int64), ("head_stride", ctypes.c_int64),
                ("capacity", ctypes.c_int64), ("rows", ctypes.c_void_p)]


class LayerTensors(ctypes.Structure):
    """layer_tensors in forward_layers.c: one decoder layer's weights and K/V pools."""

    _fields_ = [(name, ctypes.c_void_p) for name in (
        "input_norm", "qkv_proj", "qkv_bias", "o_proj", "post_norm", "gate_up_proj", "down_proj",
        "k_cache", "v_cache")] + [("quantized", ctypes.c_int64)]


class LayerStack(ctypes.Structure):
    """layer_stack in forward_layers.c: the model's sizes and what every layer shares."""

    _fields_ = ([(name, ctypes.c_int64) for name in (
        "layers", "hidden", "q_heads", "kv_heads", "head_dim", "inter")]
        + [("eps", ctypes.c_float), ("scale", ctypes.c_float)]
        + [(name, ctypes.c_int64) for name in ("capacity", "row_stride", "head_stride")]
        + [("req_to_token", ctypes.c_void_p), ("table_rows", ctypes.c_int64),
           ("table_columns", ctypes.c_int64), ("cos_sin", ctypes.c_void_p),
           ("max_positions", ctypes.c_int64)])


class StepTensors(ctypes.Structure):
    """step_tensors in forward_layers.c: one step's tokens and scratch tensors."""

    _fields_ = [("tokens", ctypes.c_int64)] + [(name, ctypes.c_void_p) for name in (
        "positions", "out_rows", "slots", "seq_lens", "hidden", "residual", "normed", "qkv",
        "attn", "gate_up", "act")] + [("hooked", ctypes.c_int64), ("hook", ctypes.c_void_p),
                                      ("dequant", ctypes.c_int64)]


# gemm_hook in forward_layers.c: (layer, which projection) -> 0 on success
GemmHook = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr, i32, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.pool_attention.restype = i32
    lib.pool_attention.argtypes = [ptr, i64, i64, ptr, ptr, i64, i64, i32, ptr, i64, i64, i64,
                                   ptr, ptr, i32, i32, i32, i32, f32, ptr]
    lib.rms_norm.restype = None
    lib.rms_norm.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, f32, i32]
    lib.rope.restype = None
    lib.rope.argtypes = [ptr, i64, i64, i64, i64, i64, ptr, ptr, i32]
    lib.rope_store_kv.restype = i32
    lib.rope_store_kv.argtypes = [ctypes.POINTER(_NewQKV), ctypes.POINTER(_PoolRows), ptr, i64,
                                  ptr, i32]
    lib.silu_and_mul.restype = None
    lib.silu_and_mul.argtypes = [ptr, i64, ptr, i64, i64, i32]
    lib.argmax_rows.restype = None
    lib.argmax_rows.argtypes = [ptr, i64, i64, i64, ptr]
    lib.gemm_bf16_available.restype = i32
    lib.gemm_bf16_available.argtypes = []
    lib.gemm_bf16.restype = i32
    lib.gemm_bf16.argtypes = [ptr, i64, ptr, ptr, ptr, i64, i64, i64, i64]
    lib.forward_layers.restype = i32
    lib.forward_layers.argtypes = [ctypes.POINTER(LayerStack), ctypes.POINTER(LayerTensors),
                                   ctypes.POINTER(StepTensors)]


def elementwise_ok(*tensors: Tensor | None) -> bool:
    """All given tensors on CPU, of one supported dtype."""
    dtype = tensors[0].dtype   # type: ignore[union-attr]
    if dtype not in _DTYPES:
        return False
    for t in tensors:
        if t is not None and (t.dtype != dtype or t.device.type != "cpu"):
            return False
    return True


def rms_norm(lib: ctypes.CDLL, x: Tensor, weight: Tensor, eps: float,
             residual: Tensor | None) -> tuple[Tensor, Tensor]:
    """As kernels.reference.rms_norm: (normed * weight, x + residual) in one pass."""
    # x, residual: [rows, hidden]; weight: [hidden]
    x = x.contiguous()
    residual = residual.contiguous() if residual is not None else None
    out = torch.empty_like(x)
    summed = torch.empty_like(x) if residual is not None else x
    lib.rms_norm(x.data_ptr(), residual.data_ptr() if residual is not None else None,
                 weight.contiguous().data_ptr(), out.data_ptr(),
                 summed.data_ptr() if residual is not None else None, x.shape[0], x.shape[1],
                 eps, _DTYPES[x.dtype])
    return out, summed


def rope(lib: ctypes.CDLL, x: Tensor, positions: Tensor, cos_sin: Tensor) -> None:
    """Rotate x [tokens, heads, head_dim] (unit last stride) in place by fp32 cos_sin rows."""
    if x.stride(2) != 1 or cos_sin.dtype != torch.float32 or not cos_sin.is_contiguous():
        raise ValueError("rope: x needs a unit last stride and cos_sin contiguous float32")
    positions = positions.to(torch.int64).contiguous()
    lib.rope(x.data_ptr(), x.stride(0), x.stride(1), x.shape[0], x.shape[1], x.shape[2],
             cos_sin.data_ptr(), positions.data_ptr(), _DTYPES[x.dtype])


def rope_store_ok(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor) -> bool:
    """Whether rope_store_kv takes these: one supported dtype throughout, unit last strides,
    K and V pools alike."""
    return (elementwise_ok(q, k, v, k_cache, v_cache) and q.stride(2) == 1 and k.stride(2) == 1
            and v.stride(2) == 1 and k_cache.stride(2) == 1 and k_cache.stride() == v_cache.stride()
            and k_cache.shape == v_cache.shape and k_cache.shape[1:] == k.shape[1:] == v.shape[1:]
            and q.shape[2] == k.shape[2] and q.shape[0] == k.shape[0] == v.shape[0])


def rope_store_kv(lib: ctypes.CDLL, q: Tensor, k: Tensor, v: Tensor, positions: Tensor,
                  cos_sin: Tensor, k_cache: Tensor, v_cache: Tensor, rows: Tensor,
                  checked: bool = False) -> None:
    """RoPE on q and k in place, then k and v into pool rows `rows`: one pass for what
    rope() twice and kernels.reference.store_kv do. Checks rope_store_ok's conditions unless
    the caller has (`checked`); rows and positions are always bounds-checked (IndexError)."""
    # q: [tokens, q_heads, d]; k, v: [tokens, kv_heads, d]; k_cache, v_cache: [capacity, kv_heads, d]
    if not checked and not rope_store_ok(q, k, v, k_cache, v_cache):
        raise ValueError("rope_store_kv: q, k, v and the pools need one dtype, matching head "
                         "shapes and unit last strides")
    if cos_sin.dtype != torch.float32 or not cos_sin.is_contiguous():
        raise ValueError("rope_store_kv: cos_sin must be contiguous float32")
    positions = positions.to(torch.int64).contiguous()
    rows = rows.to(torch.int64).contiguous()
    new = _NewQKV(q.data_ptr(), k.data_ptr(), v.data_ptr(), q.stride(0), q.stride(1),
                  k.stride(0), k.stride(1), v.stride(0), v.stride(1), q.shape[0], q.shape[1],
                  k.shape[1], q.shape[2])
    pool = _PoolRows(k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0),
                     k_cache.stride(1), k_cache.shape[0], rows.data_ptr())
    status = lib.rope_store_kv(ctypes.byref(new), ctypes.byref(pool), cos_sin.data_ptr(),
                               cos_sin.shape[0], positions.data_ptr(), _DTYPES[q.dtype])
    if status == -1:
        raise IndexError(f"rope_store_kv: a pool row is outside [0, {k_cache.shape[0]})")
    if status == -2:
        raise IndexError(f"rope_store_kv: a position is outside the RoPE table "
                         f"[0, {cos_sin.shape[0]})")


def silu_and_mul(lib: ctypes.CDLL, x: Tensor) -> Tensor:
    """As kernels.reference.silu_and_mul in x's dtype: [rows, 2 * inter] -> [rows, inter]."""
    if x.dim() != 2 or x.shape[1] % 2 or x.stride(1) != 1:
        raise ValueError(f"silu_and_mul: x must be [rows, 2 * inter] with a unit last stride, "
                         f"got shape {tuple(x.shape)} strides {x.stride()}")
    rows, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty((rows, inter), dtype=x.dtype)
    lib.silu_and_mul(x.data_ptr(), x.stride(0), out.data_ptr(), rows, inter, _DTYPES[x.dtype])
    return out


def argmax_rows(lib: ctypes.CDLL, x: Tensor) -> Tensor:
    """x.argmax(dim=-1) for fp32 x [rows, cols] with a unit last stride (int64 [rows])."""
    if x.dim() != 2 or x.dtype != torch.float32 or x.stride(1) != 1 or x.shape[1] == 0:
        raise ValueError(f"argmax_rows: x must be non-empty float32 [rows, cols] with a unit "
                         f"last stride, got {x.dtype} {tuple(x.shape)} strides {x.stride()}")
    out = torch.empty(x.shape[0], dtype=torch.int64)
    lib.argmax_rows(x.data_ptr(), x.stride(0), x.shape[0], x.shape[1], out.data_ptr())
    return out


def gemm_bf16(lib: ctypes.CDLL, x: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
    """x [rows, in] @ W^T (+ bias [out]) in bf16 for W packed by kernels.cpu.linear (shape
    [out / 16, in / 2, 32]); the caller checks dtypes and x's unit column stride."""
    rows, width = x.shape
    out_features = packed.shape[0] * 16
    y = torch.empty((rows, out_features), dtype=torch.bfloat16)
    if rows:
        lib.gemm_bf16(x.data_ptr(), x.stride(0), packed.data_ptr(),
                      bias.data_ptr() if bias is not None else None, y.data_ptr(), out_features,
                      rows, out_features, width)
    return y


def supports(q: Tensor, k_cache: Tensor) -> bool:
    """Whether pool_attention handles these tensors (CPU, bf16/fp32, sizes within the limits)."""
    q_heads, kv_heads, head_dim = q.shape[1], k_cache.shape[1], k_cache.shape[2]
    return (q.device.type == "cpu" and k_cache.dtype in _DTYPES and q.dtype == k_cache.dtype
            and q_heads % kv_heads == 0 and q_heads // kv_heads <= MAX_GROUP
            and head_dim <= MAX_HEAD_DIM and q.stride(2) == 1 and k_cache.stride(2) == 1)


def pool_attention(lib: ctypes.CDLL, q: Tensor, k_cache: Tensor, v_cache: Tensor,
                   req_to_token: Tensor, slots: Tensor, seq_lens: Tensor, scale: float) -> Tensor:
    """Query token t attends to the first seq_lens[t] tokens of request slots[t]; out in q's
    dtype. A slot outside the table or a seq_len wider than it raises IndexError."""
    # q: [tokens, q_heads, d]; k_cache, v_cache: [capacity, kv_heads, d]; slots, seq_lens: [tokens]
    tokens, q_heads, head_dim = q.shape
    if k_cache.stride() != v_cache.stride() or req_to_token.stride(1) != 1:
        raise ValueError("k_cache and v_cache must share strides; req_to_token rows contiguous")
    slots = slots.to(torch.int32).contiguous()
    seq_lens = seq_lens.to(torch.int32).contiguous()
    out = torch.empty((tokens, q_heads, head_dim), dtype=q.dtype)
    status = lib.pool_attention(
        q.data_ptr(), q.stride(0), q.stride(1), k_cache.data_ptr(), v_cache.data_ptr(),
        k_cache.stride(0), k_cache.stride(1), _DTYPES[k_cache.dtype], req_to_token.data_ptr(),
        req_to_token.stride(0), req_to_token.shape[0], req_to_token.shape[1], slots.data_ptr(),
        seq_lens.data_ptr(), tokens, q_heads, k_cache.shape[1], head_dim, scale, out.data_ptr())
    if status == -2:
        raise IndexError(f"pool_attention: a slot outside [0, {req_to_token.shape[0]}) or a "
                         f"seq_len above the table's width ({req_to_token.shape[1]})")
    if status != 0:
        raise RuntimeError("pool_attention: unsupported sizes or out of memory")
    return out


if __name__ == "__main__":
    print(build())
