"""Consistency checks of rendered deploy/k8s manifests: each takes a Manifests and raises
AssertionError naming what disagrees (test_k8s.py runs them on both overlays, and breaks each
one on purpose to see it fail)."""
from __future__ import annotations

import argparse
import contextlib
import io
from dataclasses import dataclass

import kubernetes_validate

from tests.deploy.k8s import (ENGINE, TOKENIZER, Manifests, Obj, cli_args, command_line,
                              container, container_env, container_port, pod_labels, pod_spec,
                              selector_matches, unresolved_refs)

KUBERNETES_VERSION = "1.32"  # the kubectl of the machine image and of CI
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
IMAGE_UID = 10001  # the `llmserve` user both Dockerfiles create


@dataclass(slots=True)
class Service:
    """One llmserve process as deployed: its Deployment, container, CLI and parsed flags."""

    deployment: Obj
    container: Obj
    flags: argparse.Namespace


def parse_flags(parser: argparse.ArgumentParser, args: list[str]) -> argparse.Namespace:
    """Parse with the service's real parser; an unknown flag or bad value fails the check."""
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return parser.parse_args(args)
    except SystemExit:
        message = errors.getvalue().strip().splitlines()[-1:]
        raise AssertionError(f"{parser.prog} rejects its args: {message} (args: {args})")


def engine_service(manifests: Manifests) -> Service:
    """The engine Deployment with its flags parsed by engine_svc's own parser."""
    from engine_svc.__main__ import build_parser

    deployment = manifests.get("Deployment", ENGINE)
    engine = container(deployment, "engine")
    args = cli_args(command_line(manifests, engine), "engine_svc")
    return Service(deployment, engine, parse_flags(build_parser(), args))


def tokenizer_service(manifests: Manifests) -> Service:
    """The tokenizer Deployment with its flags parsed (and validated) by tokenizer_svc's CLI."""
    from tokenizer_svc.config import build_arg_parser, config_from_args

    deployment = manifests.get("Deployment", TOKENIZER)
    tokenizer = container(deployment, "tokenizer")
    args = cli_args(command_line(manifests, tokenizer), "tokenizer_svc")
    flags = parse_flags(build_arg_parser(), args)
    try:
        config_from_args(args)
    except ValueError as error:
        raise AssertionError(f"tokenizer_svc refuses its flags: {error}")
    return Service(deployment, tokenizer, flags)


def check_schemas(manifests: Manifests) -> None:
    """Every object is valid, unknown fields included, for Kubernetes 1.32 (bundled schemas)."""
    for obj in manifests.objects:
        what = f"{manifests.overlay}: {obj.get('kind')} {obj.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            raise AssertionError(f"{what}: {path}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            raise AssertionError(f"{what}: no schema to validate against: {error.message}")


def check_probes(manifests: Manifests) -> None:
    """Probe ports are container ports; the engine is probed by native gRPC health on its gRPC
    port (startup, readiness, liveness); the tokenizer's readiness is its gRPC health."""
    for deployment in manifests.of_kind("Deployment"):
        for c in pod_spec(deployment)["containers"]:
            for probe_name in PROBES:
                probe = c.get(probe_name)
                if probe is None:
                    continue
                handler = next(k for k in ("grpc", "tcpSocket", "httpGet", "exec") if k in probe)
                if handler != "exec":
                    port = probe[handler]["port"]
                    assert container_port(c, port) is not None, (
                        f"{deployment['metadata']['name']}/{c['name']} {probe_name} port {port} "
                        f"is not a container port")
    for svc, probes in ((engine_service(manifests), PROBES),
                        (tokenizer_service(manifests), ("readinessProbe",))):
        for probe_name in probes:
            probe = svc.container.get(probe_name) or {}
            assert probe.get("grpc", {}).get("port") == svc.flags.port, (
                f"{svc.container['name']} {probe_name} must be a gRPC probe on --port "
                f"{svc.flags.port}: {probe}")
    assert "livenessProbe" in tokenizer_service(manifests).container, "tokenizer: no liveness"


def _selected_deployments(manifests: Manifests, selector: Obj) -> list[Obj]:
    return [d for d in manifests.of_kind("Deployment")
            if selector_matches(selector, pod_labels(d))]


def check_services(manifests: Manifests) -> None:
    """Each Service selects exactly one Deployment's pods, and its target ports are ports of
    that Deployment's containers; the engines' Service is headless."""
    for service in manifests.of_kind("Service"):
        name = service["metadata"]["name"]
        selected = _selected_deployments(manifests, {"matchLabels": service["spec"]["selector"]})
        assert len(selected) == 1, f"Service {name} selects {len(selected)} Deployments"
        containers = pod_spec(selected[0])["containers"]
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert any(container_port(c, target) is not None for c in containers), (
                f"Service {name} port {port['name']}: targetPort {target} is no container port "
                f"of {selected[0]['metadata']['name']}")
    engine_services = [s for s in manifests.of_kind("Service")
                       if selector_matches({"matchLabels": s["spec"]["selector"]},
                                           pod_labels(manifests.get("Deployment", ENGINE)))]
    assert engine_services, "no Service selects the engine pods"
    for service in engine_services:
        assert service["spec"].get("clusterIP") == "None", (
            f"engine Service {service['metadata']['name']} must be headless (clusterIP: None)")


def check_engine_target(manifests: Manifests) -> None:
    """The tokenizer's --engine is dns:///<engine headless Service>:<its port to engine gRPC>."""
    target = tokenizer_service(manifests).flags.engine
    engine = engine_service(manifests)
    assert target.startswith("dns:///"), f"--engine {target!r} is not a dns:/// target"
    host, _, port = target.removeprefix("dns:///").rpartition(":")
    service = manifests.get("Service", host.split(".")[0])
    assert service["spec"].get("clusterIP") == "None", f"--engine {target}: {host} not headless"
    assert selector_matches({"matchLabels": service["spec"]["selector"]},
                            pod_labels(engine.deployment)), f"{host} does not select the engines"
    entry = next((p for p in service["spec"]["ports"] if str(p["port"]) == port), None)
    assert entry is not None, f"--engine {target}: Service {host} has no port {port}"
    # headless: clients connect to the pod IPs on the target port itself
    listening = container_port(engine.container, entry["targetPort"])
    assert listening == engine.flags.port == int(port), (
        f"--engine {target}: port {port}, but the engine serves gRPC on {engine.flags.port}")


def check_disruption_budgets(manifests: Manifests) -> None:
    """Each PDB selects exactly one Deployment's pods; the tokenizer has one."""
    covered = set()
    for pdb in manifests.of_kind("PodDisruptionBudget"):
        selected = _selected_deployments(manifests, pdb["spec"]["selector"])
        assert len(selected) == 1, f"PDB {pdb['metadata']['name']} selects {len(selected)}"
        covered.add(selected[0]["metadata"]["name"])
    assert TOKENIZER in covered, "no PodDisruptionBudget covers the tokenizer pods"


def check_autoscaler(manifests: Manifests) -> None:
    """The HPA scales the tokenizer Deployment on CPU, which its pods request; the Deployment
    leaves replicas to it; minReplicas leaves a pod serving while the PDB evicts one."""
    hpas = manifests.of_kind("HorizontalPodAutoscaler")
    assert len(hpas) == 1, f"expected one HPA, found {len(hpas)}"
    spec = hpas[0]["spec"]
    ref = spec["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment", TOKENIZER), (
        f"HPA scales {ref}, not the tokenizer Deployment")
    resources = [m["resource"]["name"] for m in spec["metrics"] if m["type"] == "Resource"]
    assert resources == ["cpu"], f"HPA metrics: {spec['metrics']}"
    tokenizer = tokenizer_service(manifests)
    assert "cpu" in tokenizer.container["resources"].get("requests", {}), "no CPU request"
    assert "replicas" not in tokenizer.deployment["spec"], "replicas would fight the HPA"
    assert spec.get("minReplicas", 1) >= 2, "HPA minReplicas < 2: a PDB eviction empties it"


def _gpus(c: Obj) -> int:
    resources = c.get("resources") or {}
    return max(int((resources.get(kind) or {}).get("nvidia.com/gpu", 0))
               for kind in ("requests", "limits"))


def check_gpu_requests(manifests: Manifests) -> None:
    """gpu: the engine has exactly one nvidia.com/gpu and --device cuda; cpu: nothing asks for a
    GPU and the engine runs --device cpu."""
    engine = engine_service(manifests)
    workloads = manifests.of_kind("Deployment") + manifests.of_kind("Job")
    others = [c for w in workloads for c in pod_spec(w)["containers"] if c is not engine.container]
    assert all(_gpus(c) == 0 for c in others), "only the engine container may ask for a GPU"
    if manifests.overlay == "gpu":
        assert _gpus(engine.container) == 1, "gpu overlay: the engine needs nvidia.com/gpu: 1"
        assert engine.flags.device == "cuda", f"gpu overlay: --device {engine.flags.device}"
    else:
        assert _gpus(engine.container) == 0, "cpu overlay: the engine must not ask for a GPU"
        assert engine.flags.device == "cpu", f"cpu overlay: --device {engine.flags.device}"


def check_command_lines(manifests: Manifests) -> None:
    """Every $(VAR) in args is defined; both services parse their flags with the real parsers
    (engine_service/tokenizer_service), listen on all interfaces, and serve gRPC and metrics
    on the container ports named grpc and metrics."""
    for deployment in manifests.of_kind("Deployment"):
        for c in pod_spec(deployment)["containers"]:
            missing = unresolved_refs(c.get("args") or [], container_env(manifests, c))
            assert not missing, f"{c['name']}: undefined $(...) in args: {missing}"
    for svc in (engine_service(manifests), tokenizer_service(manifests)):
        assert svc.flags.host == "0.0.0.0", f"{svc.container['name']} listens on {svc.flags.host}"
        for port_name, flag in (("grpc", svc.flags.port), ("metrics", svc.flags.metrics_port)):
            assert container_port(svc.container, port_name) == flag, (
                f"{svc.container['name']}: container port {port_name!r} is not the flag's {flag}")


def _pre_stop_seconds(c: Obj) -> float:
    pre_stop = (c.get("lifecycle") or {}).get("preStop")
    assert pre_stop, f"{c['name']}: no preStop hook"
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[0] == "sleep", f"{c['name']}: preStop {command}"
    return float(command[1])


def check_termination_grace(manifests: Manifests) -> None:
    """terminationGracePeriodSeconds covers the preStop sleep plus the service's own drain; a
    gRPC liveness probe (NOT_SERVING while draining) tolerates the whole drain, for kubelets that
    probe terminating pods."""
    engine, tokenizer = engine_service(manifests), tokenizer_service(manifests)
    for svc, drain_s in ((engine, engine.flags.drain_timeout),
                         (tokenizer, tokenizer.flags.grace_period)):
        name = svc.deployment["metadata"]["name"]
        grace = pod_spec(svc.deployment).get("terminationGracePeriodSeconds", 30)
        needed = _pre_stop_seconds(svc.container) + drain_s
        assert grace > needed, f"{name}: grace {grace}s <= preStop + drain {needed}s"
        liveness = svc.container.get("livenessProbe") or {}
        if "grpc" in liveness:
            failures = liveness.get("failureThreshold", 3)
            tolerated = (failures - 1) * liveness.get("periodSeconds", 10)
            assert tolerated >= drain_s, f"{name}: liveness kills after {tolerated}s of a drain"


def check_scrape_annotations(manifests: Manifests) -> None:
    """Pods carry prometheus.io annotations for the port their --metrics-port serves."""
    for svc in (engine_service(manifests), tokenizer_service(manifests)):
        notes = svc.deployment["spec"]["template"]["metadata"].get("annotations") or {}
        expected = {"prometheus.io/scrape": "true", "prometheus.io/path": "/metrics",
                    "prometheus.io/port": str(svc.flags.metrics_port)}
        found = {key: notes.get(key) for key in expected}
        assert found == expected, f"{svc.container['name']} scrape annotations {found}"


def _mounted_claim(manifests: Manifests, workload: Obj, c: Obj, path: str) -> str:
    """The PVC (which must exist in the render) holding `path` inside this container."""
    volumes = {v["name"]: v for v in pod_spec(workload).get("volumes") or []}
    for mount in c.get("volumeMounts") or []:
        if (path + "/").startswith(mount["mountPath"].rstrip("/") + "/"):
            claim = volumes[mount["name"]].get("persistentVolumeClaim", {}).get("claimName")
            assert claim, f"{c['name']}: {path} is not on a PersistentVolumeClaim"
            manifests.get("PersistentVolumeClaim", claim)
            return claim
    raise AssertionError(f"{c['name']}: {path} is on no volume mount")


def check_model_volume(manifests: Manifests) -> None:
    """Engine, tokenizer and the model Job use one model directory on one PVC."""
    engine, tokenizer = engine_service(manifests), tokenizer_service(manifests)
    assert str(engine.flags.model) == str(tokenizer.flags.model), "engine/tokenizer --model"
    claims = {_mounted_claim(manifests, s.deployment, s.container, str(s.flags.model))
              for s in (engine, tokenizer)}
    for job in manifests.of_kind("Job"):
        for c in pod_spec(job)["containers"]:
            args = c.get("args") or []
            if "--out" in args:
                out = args[args.index("--out") + 1]
                assert out == str(engine.flags.model), f"Job writes {out}, not --model"
                claims.add(_mounted_claim(manifests, job, c, out))
    assert len(claims) == 1, f"model directory on several claims: {claims}"


def check_security(manifests: Manifests) -> None:
    """Pods run as the images' non-root uid; containers cannot escalate privileges."""
    for workload in manifests.of_kind("Deployment") + manifests.of_kind("Job"):
        spec = pod_spec(workload)
        pod_ctx = spec.get("securityContext") or {}
        name = workload["metadata"]["name"]
        assert pod_ctx.get("runAsNonRoot") is True and pod_ctx.get("runAsUser") == IMAGE_UID, (
            f"{name}: pods must run as uid {IMAGE_UID} (non-root): {pod_ctx}")
        for c in spec.get("initContainers", []) + spec["containers"]:
            ctx = c.get("securityContext") or {}
            assert ctx.get("allowPrivilegeEscalation") is False, f"{name}/{c['name']}: {ctx}"
