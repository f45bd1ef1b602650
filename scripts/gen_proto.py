"""Generate the Python gRPC stubs (+ .pyi type stubs) from protos/ into <repo>/llmserve/.

Usage: python scripts/gen_proto.py [--out REPO_ROOT]

Produces llmserve/__init__.py, llmserve/v1/__init__.py, *_pb2.py, *_pb2_grpc.py and .pyi
files, so code imports `from llmserve.v1 import generate_pb2, engine_pb2_grpc`.
Exits non-zero with protoc's message when a proto does not compile.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "protos"
PACKAGE_DIR = Path("llmserve") / "v1"


def find_protos(proto_root: Path) -> list[Path]:
    """All .proto files of the llmserve package, relative to proto_root, sorted."""
    files = sorted((proto_root / PACKAGE_DIR).glob("*.proto"))
    if not files:
        raise SystemExit(f"gen_proto: no .proto files under {proto_root / PACKAGE_DIR}")
    return [path.relative_to(proto_root) for path in files]


def mypy_plugin_args() -> list[str]:
    """protoc flags for mypy-protobuf's plugins when installed next to this Python."""
    bin_dir = Path(sys.executable).parent
    mypy = bin_dir / "protoc-gen-mypy"
    mypy_grpc = bin_dir / "protoc-gen-mypy_grpc"
    if mypy.exists() and mypy_grpc.exists():
        return [f"--plugin=protoc-gen-mypy={mypy}", f"--plugin=protoc-gen-mypy_grpc={mypy_grpc}"]
    return []


def run_protoc(proto_root: Path, protos: list[Path], out_dir: Path) -> None:
    """Run grpc_tools.protoc in-process; raise SystemExit with a clear message on failure."""
    from grpc_tools import protoc  # imported here so --help works without grpcio-tools

    import importlib.resources

    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    plugins = mypy_plugin_args()
    stub_flags = ([f"--mypy_out={out_dir}", f"--mypy_grpc_out={out_dir}"] if plugins
                  else [f"--pyi_out={out_dir}"])
    args = ["grpc_tools.protoc", f"-I{proto_root}", f"-I{well_known}",
            f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", *plugins, *stub_flags,
            *[str(p) for p in protos]]
    status = protoc.main(args)
    if status != 0:
        raise SystemExit(f"gen_proto: protoc failed with status {status} (see the errors above); "
                         f"command: {' '.join(args)}")


def install(generated: Path, out_root: Path) -> list[Path]:
    """Replace out_root/llmserve/v1 with the freshly generated files; add package markers."""
    target = out_root / PACKAGE_DIR
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(generated / PACKAGE_DIR, target)
    (out_root / "llmserve" / "__init__.py").write_text(
        '"""Generated gRPC stubs for llmserve (scripts/gen_proto.py); do not edit."""\n')
    (target / "__init__.py").write_text('"""Generated from protos/llmserve/v1; do not edit."""\n')
    return sorted(target.iterdir())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT,
                        help="directory that receives the llmserve/ package (default: repo root)")
    parser.add_argument("--proto-root", type=Path, default=PROTO_ROOT,
                        help="include root holding llmserve/v1/*.proto (default: protos/)")
    args = parser.parse_args(argv)
    protos = find_protos(args.proto_root)
    with tempfile.TemporaryDirectory(prefix="llmserve-proto-") as tmp:
        run_protoc(args.proto_root, protos, Path(tmp))
        written = install(Path(tmp), args.out)
    print(f"gen_proto: {len(protos)} protos -> {len(written)} files in {args.out / PACKAGE_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
