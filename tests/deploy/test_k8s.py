"""deploy/k8s renders with `kubectl kustomize` (overlays gpu and cpu), every object validates
offline against the Kubernetes 1.32 schemas (kubernetes-validate), and probes, ports, labels,
selectors, flags and grace periods agree with each other and with the real CLIs. Each check is
also run on a deliberately broken copy, to show that it fails."""
from __future__ import annotations

import copy
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy import k8s_checks as checks
from tests.deploy.k8s import (ENGINE, K8S_DIR, OVERLAYS, PODMONITOR_COMPONENT, REPO_ROOT,
                              TOKENIZER, Manifests, container, container_port, kubectl_path,
                              pod_labels, render, render_with_components, selector_matches)

pytestmark = pytest.mark.skipif(kubectl_path() is None,
                                reason="kubectl is not installed (the machine image and CI have "
                                       "1.32 at /usr/bin/kubectl)")

CHECKS = [checks.check_schemas, checks.check_probes, checks.check_services,
          checks.check_engine_target, checks.check_disruption_budgets, checks.check_autoscaler,
          checks.check_gpu_requests, checks.check_command_lines, checks.check_termination_grace,
          checks.check_scrape_annotations, checks.check_model_volume, checks.check_security]


@pytest.fixture(scope="module")
def rendered() -> dict[str, Manifests]:
    """Both overlays, rendered once."""
    return {overlay: Manifests(overlay, render(K8S_DIR / "overlays" / overlay))
            for overlay in OVERLAYS}


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_overlay_passes_check(rendered: dict[str, Manifests], overlay: str,
                              check: Callable[[Manifests], None]) -> None:
    check(rendered[overlay])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_whole_stack(rendered: dict[str, Manifests], overlay: str) -> None:
    manifests = rendered[overlay]
    kinds = sorted(o["kind"] for o in manifests.objects)
    assert kinds == sorted(["ConfigMap", "ConfigMap", "Deployment", "Deployment", "Service",
                            "Service", "PodDisruptionBudget", "PodDisruptionBudget",
                            "HorizontalPodAutoscaler", "PersistentVolumeClaim", "Job"])
    images = {c["image"] for kind in ("Deployment", "Job") for w in manifests.of_kind(kind)
              for c in w["spec"]["template"]["spec"]["containers"]}
    compose = yaml.safe_load((REPO_ROOT / "deploy" / "docker-compose.yml").read_text())
    built = {s["image"] for s in compose["services"].values() if "build" in s}
    assert images == built, "the images must be the ones docker-compose.yml builds and tags"
    assert not manifests.of_kind("PodMonitor"), "the PodMonitor is opt-in (a component)"


def test_cpu_overlay_asks_for_less_than_gpu(rendered: dict[str, Manifests]) -> None:
    def engine_memory_gi(overlay: str) -> float:
        resources = container(rendered[overlay].get("Deployment", ENGINE), "engine")["resources"]
        return float(resources["requests"]["memory"].removesuffix("Gi"))
    assert engine_memory_gi("cpu") < engine_memory_gi("gpu")


def test_image_uid_is_the_one_the_pods_run_as() -> None:
    for dockerfile in ("Dockerfile.engine", "Dockerfile.tokenizer"):
        text = (REPO_ROOT / "deploy" / dockerfile).read_text()
        assert f"--uid {checks.IMAGE_UID}" in text and "USER llmserve" in text, dockerfile


def test_podmonitor_component_scrapes_both_services_metrics_ports() -> None:
    manifests = Manifests("gpu", render_with_components(K8S_DIR / "overlays" / "gpu",
                                                        [PODMONITOR_COMPONENT]))
    monitors = manifests.of_kind("PodMonitor")
    assert len(monitors) == 1 and monitors[0]["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitors[0]["spec"]
    for name, container_name in ((ENGINE, "engine"), (TOKENIZER, "tokenizer")):
        deployment = manifests.get("Deployment", name)
        assert selector_matches(spec["selector"], pod_labels(deployment)), name
        for endpoint in spec["podMetricsEndpoints"]:
            assert endpoint["path"] == "/metrics"
            assert container_port(container(deployment, container_name), endpoint["port"])
    job = manifests.get("Job", "llmserve-model")
    assert not selector_matches(spec["selector"], pod_labels(job)), "the model Job has no metrics"


def test_make_k8s_manifests_writes_both_overlays(tmp_path: Path) -> None:
    done = subprocess.run(["make", "-s", "k8s-manifests", f"K8S_OUT={tmp_path}"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for overlay in OVERLAYS:
        written = (tmp_path / f"{overlay}.yaml").read_text()
        assert list(yaml.safe_load_all(written)) == render(K8S_DIR / "overlays" / overlay)


# --- each check fails on a manifest broken on purpose --------------------------------------------

def _engine(m: Manifests) -> dict[str, Any]:
    return container(m.get("Deployment", ENGINE), "engine")


def _tokenizer(m: Manifests) -> dict[str, Any]:
    return container(m.get("Deployment", TOKENIZER), "tokenizer")


def _flags(m: Manifests, prefix: str) -> dict[str, str]:
    return next(c["data"] for c in m.of_kind("ConfigMap")
                if c["metadata"]["name"].startswith(prefix))


def _set(obj: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for key in parents:
        obj = obj[key]
    obj[leaf] = value


# name -> (check, what the check's message must say, damage done to a copy of the manifests)
BREAKS: dict[str, tuple[Callable[[Manifests], None], str, Callable[[Manifests], None]]] = {
    "unknown field": (checks.check_schemas, "'readinesProbe' was unexpected",
                      lambda m: _engine(m).__setitem__("readinesProbe", {"grpc": {"port": 1}})),
    "bad field type": (checks.check_schemas, "is not of type 'integer'",
                       lambda m: _set(_engine(m), "readinessProbe.grpc.port", "grpc")),
    "probe on a port not declared": (checks.check_probes, "port 50099 is not a container port",
                                     lambda m: _set(_engine(m), "livenessProbe.grpc.port", 50099)),
    "engine readiness by TCP": (checks.check_probes, "must be a gRPC probe",
                                lambda m: _engine(m).__setitem__(
                                    "readinessProbe", {"tcpSocket": {"port": "grpc"}})),
    "tokenizer liveness missing": (checks.check_probes, "tokenizer: no liveness",
                                   lambda m: _tokenizer(m).pop("livenessProbe")),
    "Service selector typo": (checks.check_services, "selects 0 Deployments", lambda m: _set(
        m.get("Service", TOKENIZER), "spec.selector", {"app.kubernetes.io/name": "tokeniser"})),
    "Service targetPort unknown": (checks.check_services, "targetPort https is no container port",
                                   lambda m: _set(m.get("Service", TOKENIZER)["spec"]["ports"][1],
                                                  "targetPort", "https")),
    "engine Service not headless": (checks.check_services, "must be headless", lambda m: m.get(
        "Service", "llmserve-engine-headless")["spec"].pop("clusterIP")),
    "--engine names the wrong Service": (checks.check_engine_target, "not headless", lambda m: _set(
        _flags(m, "llmserve-tokenizer-flags"), "TOKENIZER_ENGINE",
        "dns:///llmserve-tokenizer:50051")),
    "--engine on the wrong port": (checks.check_engine_target, "serves gRPC on 50052",
                                   lambda m: _set(_flags(m, "llmserve-tokenizer-flags"),
                                                  "TOKENIZER_ENGINE",
                                                  "dns:///llmserve-engine-headless:8002")),
    "PDB selector typo": (checks.check_disruption_budgets, "selects 0", lambda m: _set(
        m.get("PodDisruptionBudget", TOKENIZER), "spec.selector.matchLabels",
        {"app.kubernetes.io/name": "tokeniser"})),
    "HPA targets the engine": (checks.check_autoscaler, "not the tokenizer Deployment",
                               lambda m: _set(m.get("HorizontalPodAutoscaler", TOKENIZER),
                                              "spec.scaleTargetRef.name", ENGINE)),
    "tokenizer without CPU request": (checks.check_autoscaler, "no CPU request",
                                      lambda m: _tokenizer(m)["resources"]["requests"].pop("cpu")),
    "GPU on the tokenizer": (checks.check_gpu_requests, "only the engine", lambda m: _set(
        _tokenizer(m)["resources"], "limits", {"memory": "1Gi", "nvidia.com/gpu": 1})),
    "engine GPU count flipped": (checks.check_gpu_requests, "overlay: the engine", lambda m: _set(
        _engine(m)["resources"], "limits", {"memory": "1Gi"} if m.overlay == "gpu"
        else {"memory": "1Gi", "nvidia.com/gpu": 1})),
    "unknown engine flag": (checks.check_command_lines, "unrecognized arguments: --no-such-flag",
                            lambda m: _engine(m)["args"].append("--no-such-flag=1")),
    "undefined $(VAR)": (checks.check_command_lines, "undefined $(...) in args: ['NO_SUCH_VAR']",
                         lambda m: _engine(m)["args"].append("--log-level=$(NO_SUCH_VAR)")),
    "non-numeric flag value": (checks.check_command_lines, "invalid int value: 'many'",
                               lambda m: _set(_flags(m, "llmserve-engine-flags"),
                                              "ENGINE_MAX_NUM_SEQS", "many")),
    "tokenizer flag refused": (checks.check_command_lines, "tokenizer_svc refuses its flags",
                               lambda m: _set(_flags(m, "llmserve-tokenizer-flags"),
                                              "TOKENIZER_ENGINE", "engines")),
    "metrics port not declared": (checks.check_command_lines, "not the flag's 9100",
                                  lambda m: _tokenizer(m)["args"].append("--metrics-port=9100")),
    "grace shorter than drain": (checks.check_termination_grace, "grace 30s", lambda m: _set(
        m.get("Deployment", ENGINE), "spec.template.spec.terminationGracePeriodSeconds", 30)),
    "liveness cuts the drain": (checks.check_termination_grace, "liveness kills after 20s",
                                lambda m: _set(_engine(m), "livenessProbe.failureThreshold", 3)),
    "drain longer than grace": (checks.check_termination_grace, "drain 65.0s", lambda m: _set(
        _flags(m, "llmserve-tokenizer-flags"), "TOKENIZER_GRACE_PERIOD_S", "60")),
    "scrape port stale": (checks.check_scrape_annotations, "'prometheus.io/port': '9100'",
                          lambda m: m.get("Deployment", ENGINE)["spec"]["template"]["metadata"][
                              "annotations"].__setitem__("prometheus.io/port", "9100")),
    "model on another claim": (checks.check_model_volume, "PersistentVolumeClaim other-models",
                               lambda m: _set(m.get("Deployment", TOKENIZER)["spec"]["template"][
                                   "spec"]["volumes"][0], "persistentVolumeClaim",
                                   {"claimName": "other-models"})),
    "Job writes elsewhere": (checks.check_model_volume, "Job writes /models/other", lambda m: _set(
        m.get("Job", "llmserve-model")["spec"]["template"]["spec"]["containers"][0], "args",
        ["--out", "/models/other"])),
    "root pod": (checks.check_security, "non-root", lambda m: _set(
        m.get("Deployment", ENGINE)["spec"]["template"]["spec"]["securityContext"],
        "runAsUser", 0)),
}


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("breakage", list(BREAKS))
def test_check_fails_on_broken_manifests(rendered: dict[str, Manifests], overlay: str,
                                         breakage: str) -> None:
    check, message, damage = BREAKS[breakage]
    broken = copy.deepcopy(rendered[overlay])
    damage(broken)
    with pytest.raises(AssertionError, match=re.escape(message)):
        check(broken)


def test_every_check_is_broken_at_least_once() -> None:
    assert {check for check, _, _ in BREAKS.values()} == set(CHECKS)
