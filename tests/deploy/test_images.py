"""The images' inputs: pinned requirements consistent with requirements.txt, base images, and a
tokenizer service that never imports torch (its image has none)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.deploy.compose import DEPLOY_DIR, REPO_ROOT
from tests.deploy.dockerfile import parse_dockerfile

TORCH_FROM_BASE_IMAGE = {"torch", "triton"}
# test and benchmark tools: not needed inside the images
DEV_ONLY = {"hypothesis", "pytest", "pytest-timeout", "mypy-protobuf", "pyyaml", "matplotlib",
            "kubernetes-validate", "openai", "jsonschema"}
TOKENIZER_ONLY = {"fastapi", "uvicorn"}  # the tokenizer's OpenAI HTTP API
HEAVY = {"torch", "triton", "transformers", "numpy"}


def pins(path: Path) -> dict[str, str]:
    """name -> version of every `name==version` line; any other requirement line fails."""
    found = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and version, f"{path.name}: {line!r} is not pinned with =="
        found[name.strip().lower()] = version.strip()
    return found


def test_image_requirements_use_the_pins_of_requirements_txt():
    root = pins(REPO_ROOT / "requirements.txt")
    for name in ("requirements-engine.txt", "requirements-tokenizer.txt", "requirements-build.txt"):
        for package, version in pins(DEPLOY_DIR / name).items():
            assert root.get(package) == version, f"{name}: {package}=={version} vs requirements.txt"


def test_engine_requirements_are_requirements_txt_minus_torch_and_dev_tools():
    root = pins(REPO_ROOT / "requirements.txt")
    engine = pins(DEPLOY_DIR / "requirements-engine.txt")
    assert set(engine) == set(root) - TORCH_FROM_BASE_IMAGE - DEV_ONLY - TOKENIZER_ONLY


def test_tokenizer_image_requirements_carry_no_torch_stack():
    tokenizer = pins(DEPLOY_DIR / "requirements-tokenizer.txt")
    assert not set(tokenizer) & HEAVY
    assert {"tokenizers", "jinja2", "grpcio", "protobuf", "prometheus-client"} <= set(tokenizer)
    assert TOKENIZER_ONLY <= set(tokenizer)


def test_engine_image_builds_on_a_cuda_pytorch_runtime_image_matching_the_torch_pin():
    global_args, stages = parse_dockerfile(DEPLOY_DIR / "Dockerfile.engine")
    base = global_args["BASE_IMAGE"]
    repository, _, tag = base.partition(":")
    torch_pin = pins(REPO_ROOT / "requirements.txt")["torch"]
    assert repository == "pytorch/pytorch"
    assert tag.startswith(f"{torch_pin}-cuda") and tag.endswith("-runtime"), tag
    assert stages[0].base == "${BASE_IMAGE}"
    assert [s.name for s in stages] == ["base", "model", "engine"]
    installs = " ".join(stages[0].args("RUN"))
    assert "requirements-engine.txt" in installs and "gen_proto.py" in installs


def test_tokenizer_image_is_slim_python_and_generates_stubs_at_build_time():
    global_args, stages = parse_dockerfile(DEPLOY_DIR / "Dockerfile.tokenizer")
    python_image = global_args["PYTHON_IMAGE"]
    assert python_image.startswith("python:") and "slim" in python_image
    runs = [run for stage in stages for run in stage.args("RUN")]
    assert any("gen_proto.py" in run for run in runs)
    assert not any("torch" in run and "pip" in run for run in runs)


def test_tokenizer_service_never_imports_torch(default_model_dir):
    probe = (
        "import sys\n"
        "import tokenizer_svc.__main__, tokenizer_svc.app, tokenizer_svc.server\n"
        "from tokenizer_svc.tokenizer import ModelTokenizer\n"
        f"tok = ModelTokenizer.from_pretrained({str(default_model_dir)!r})\n"
        "ids = tok.encode('hello world')\n"
        "assert tok.decode(ids).strip().endswith('hello world'), tok.decode(ids)\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'triton') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout


def test_tokenizer_cli_startup_imports_no_torch():
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "tokenizer_svc", "--help"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    assert "tokenizer_svc.config" in imported  # the probe sees real imports
    assert not {name.split(".")[0] for name in imported} & {"torch", "transformers"}
