"""The C kernels build for every x86-64 CPU the service may land on, not only this one.

native.py compiles with -march=native, so a preprocessor branch that only this CPU's features
take (AVX512-BF16 here) can hide a build break elsewhere; when the build fails, every kernel
falls back to torch. Build the library for older and newer targets than this machine and check
each exports the same functions.
"""
from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import pytest

from kernels.cpu import native

TARGETS = (
    "x86-64-v3",        # AVX2 + FMA, no AVX-512: the vec16 fallbacks
    "icelake-server",   # AVX-512 without BF16: bf16 by conversion
    "cooperlake",       # AVX-512 with BF16: the vdpbf16ps paths
    "sapphirerapids",   # AVX-512 BF16 with AMX
)

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64" or native._compiler() is None,
                                reason="needs an x86-64 C compiler")


def _build(march: str, out: Path) -> set[str]:
    """Link the whole library for `march` (at -O1: the branches matter, not the speed) and
    return the names it exports."""
    flags = [f"-march={march}" if f == "-march=native" else ("-O1" if f == "-O3" else f)
             for f in native.FLAGS]
    result = subprocess.run([native._compiler(), *flags, "-Wl,--no-undefined", "-o", str(out),
                             *map(str, native.SOURCES), "-lm"], capture_output=True, text=True)
    assert result.returncode == 0, f"-march={march} does not build:\n{result.stderr[-4000:]}"
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(out)], capture_output=True,
                             text=True, check=True).stdout.split("\n")
    return {line.split()[-1] for line in symbols if " T " in line}


def test_library_builds_and_exports_the_same_functions_on_every_target(tmp_path: Path) -> None:
    exported = {march: _build(march, tmp_path / f"{march}.so") for march in ("native", *TARGETS)}
    assert "pool_attention" in exported["native"] and len(exported["native"]) >= 10
    for march in TARGETS:
        assert exported[march] == exported["native"], march
