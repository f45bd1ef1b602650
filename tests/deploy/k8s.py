"""Render deploy/k8s with `kubectl kustomize` and read the result: objects by kind and name, pod
labels and selectors, container ports, and each container's command line as the kubelet would
run it (image entrypoint + args, with $(VAR) expanded from the container's environment)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.dockerfile import exec_form, parse_dockerfile

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = REPO_ROOT / "deploy" / "k8s"
OVERLAYS = ("gpu", "cpu")
PODMONITOR_COMPONENT = K8S_DIR / "components" / "podmonitor"
ENGINE, TOKENIZER = "llmserve-engine", "llmserve-tokenizer"  # Deployment names
# image name (as docker-compose.yml tags it) -> (Dockerfile, stage) that builds it
IMAGE_SOURCES = {"llmserve-engine": ("Dockerfile.engine", "engine"),
                 "llmserve-tokenizer": ("Dockerfile.tokenizer", "tokenizer"),
                 "llmserve-model": ("Dockerfile.engine", "model")}
_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")

Obj = dict[str, Any]


def kubectl_path() -> str | None:
    """The kubectl binary on PATH, or None."""
    return shutil.which("kubectl")


def render(directory: Path) -> list[Obj]:
    """The objects `kubectl kustomize DIRECTORY` prints, in order."""
    kubectl = kubectl_path()
    assert kubectl, "kubectl is not on PATH"
    done = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, f"kubectl kustomize {directory} failed:\n{done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def render_with_components(overlay: Path, components: list[Path]) -> list[Obj]:
    """An overlay rendered with extra kustomize components (as a user's own overlay would)."""
    with tempfile.TemporaryDirectory() as scratch:
        lines = ["resources:", f"  - {os.path.relpath(overlay, scratch)}", "components:"]
        lines += [f"  - {os.path.relpath(c, scratch)}" for c in components]
        (Path(scratch) / "kustomization.yaml").write_text("\n".join(lines) + "\n")
        return render(Path(scratch))


@dataclass(slots=True)
class Manifests:
    """The objects one overlay renders to."""

    overlay: str
    objects: list[Obj]

    def of_kind(self, kind: str) -> list[Obj]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> Obj:
        found = [o for o in self.of_kind(kind) if o["metadata"]["name"] == name]
        assert len(found) == 1, f"{self.overlay}: expected one {kind} {name}, found {len(found)}"
        return found[0]

    def config_map_data(self, name: str) -> dict[str, str]:
        return dict(self.get("ConfigMap", name).get("data") or {})


def pod_spec(workload: Obj) -> Obj:
    """spec.template.spec of a Deployment or Job."""
    return workload["spec"]["template"]["spec"]


def pod_labels(workload: Obj) -> dict[str, str]:
    return dict(workload["spec"]["template"]["metadata"].get("labels") or {})


def container(workload: Obj, name: str) -> Obj:
    found = [c for c in pod_spec(workload)["containers"] if c["name"] == name]
    assert len(found) == 1, f"{workload['metadata']['name']}: no single container {name!r}"
    return found[0]


def selector_matches(selector: Obj, labels: dict[str, str]) -> bool:
    """Whether a LabelSelector (matchLabels + matchExpressions) selects these labels; an empty
    selector is treated as matching nothing (never what a Service or PDB here means)."""
    match_labels = selector.get("matchLabels") or {}
    expressions = selector.get("matchExpressions") or []
    if not match_labels and not expressions:
        return False
    if any(labels.get(key) != value for key, value in match_labels.items()):
        return False
    for expr in expressions:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {"In": key in labels and labels[key] in values,
              "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def container_port(container_obj: Obj, port: int | str) -> int | None:
    """The containerPort that `port` (a number or a port name) names, or None."""
    for entry in container_obj.get("ports") or []:
        if port in (entry["containerPort"], entry.get("name")):
            return entry["containerPort"]
    return None


def container_env(manifests: Manifests, container_obj: Obj) -> dict[str, str]:
    """The variables the kubelet sets: envFrom ConfigMaps, then env (which overrides)."""
    env: dict[str, str] = {}
    for source in container_obj.get("envFrom") or []:
        assert "configMapRef" in source, f"unexpected envFrom source {source}"
        env.update(manifests.config_map_data(source["configMapRef"]["name"]))
    for entry in container_obj.get("env") or []:
        if "value" in entry:
            env[entry["name"]] = entry["value"]
    return env


def unresolved_refs(args: list[str], env: dict[str, str]) -> list[str]:
    """$(NAME) references in args that the environment does not define."""
    return [name for arg in args for name in _VAR_REF.findall(arg) if name not in env]


def expand(args: list[str], env: dict[str, str]) -> list[str]:
    """The kubelet's $(NAME) expansion (undefined references stay as written)."""
    return [_VAR_REF.sub(lambda m: env.get(m.group(1), m.group(0)), arg) for arg in args]


def image_name(image: str) -> str:
    """`registry/path/llmserve-engine:tag` -> `llmserve-engine`."""
    return image.rsplit("/", 1)[-1].split("@", 1)[0].split(":", 1)[0]


def image_entrypoint(image: str) -> list[str]:
    """The exec-form ENTRYPOINT of the Dockerfile stage that builds this image."""
    dockerfile, stage_name = IMAGE_SOURCES[image_name(image)]
    _, stages = parse_dockerfile(REPO_ROOT / "deploy" / dockerfile)
    stage = next(s for s in stages if s.name == stage_name)
    entrypoint = stage.last("ENTRYPOINT")
    assert entrypoint, f"{dockerfile} stage {stage_name} has no ENTRYPOINT"
    return exec_form(entrypoint)


def command_line(manifests: Manifests, container_obj: Obj) -> list[str]:
    """What the container runs: its command (or the image's ENTRYPOINT) + args, expanded."""
    env = container_env(manifests, container_obj)
    command = container_obj.get("command") or image_entrypoint(container_obj["image"])
    return expand(list(command) + list(container_obj.get("args") or []), env)


def cli_args(argv: list[str], module: str) -> list[str]:
    """The arguments after `python -m MODULE` in a command line."""
    for start in range(len(argv) - 2):
        if argv[start].startswith("python") and argv[start + 1:start + 3] == ["-m", module]:
            return argv[start + 3:]
    raise AssertionError(f"{argv} does not run `python -m {module}`")
