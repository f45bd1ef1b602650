"""deploy/docker-compose.yml, validated by the real compose CLI and cross-checked with the files
it references: Dockerfiles and their stages, mounts, ports, healthchecks, Prometheus, Grafana."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.deploy.compose import (DEPLOY_DIR, REPO_ROOT, flag_value, load_yaml, parse_port,
                                  parse_volume)
from tests.deploy.dockerfile import exec_form, healthcheck_command
from tests.deploy.images import (build_stages, copied_paths, dockerignore_allows,
                                 dockerignore_rules, effective)

MODEL_TARGET = "/models/smollm2-135m-instruct"
HEALTHCHECK_SCRIPT = "/app/deploy/healthcheck.py"
PROFILE_OF = {"engine": ["gpu"], "tokenizer": ["gpu"], "engine-cpu": ["cpu"],
              "tokenizer-cpu": ["cpu"], "model": None, "prometheus": None, "grafana": None}
ENGINES = ("engine", "engine-cpu")
TOKENIZERS = ("tokenizer", "tokenizer-cpu")
GRPC_SERVICES = ENGINES + TOKENIZERS
ALIAS = {"engine-cpu": "engine", "tokenizer-cpu": "tokenizer"}


def services(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return config["services"]


def aliases(service: dict[str, Any]) -> set[str]:
    networks = service.get("networks") or {}
    if isinstance(networks, list):
        return set()
    return {alias for net in networks.values() if net for alias in net.get("aliases", [])}


def names_of(config: dict[str, Any], name: str) -> set[str]:
    """DNS names a service answers to on the compose network: its name and its aliases."""
    return {name} | aliases(services(config)[name])


def test_services_and_profiles(compose_config):
    found = services(compose_config)
    assert set(found) == set(PROFILE_OF)
    for name, profiles in PROFILE_OF.items():
        assert found[name].get("profiles") == profiles, name


def test_only_the_public_api_ports_are_published_on_all_interfaces(compose_config):
    public = {}
    for name, service in services(compose_config).items():
        for port in map(parse_port, service.get("ports", [])):
            if port.host_ip in ("", "0.0.0.0", "::"):
                public.setdefault(name, []).append(port)
            else:
                assert port.host_ip == "127.0.0.1", (name, port)
    assert set(public) == set(TOKENIZERS)
    for ports in public.values():
        assert [(p.published, p.target) for p in ports] == [(50051, 50051), (8000, 8000)]
    for name in ENGINES + ("model",):
        assert not services(compose_config)[name].get("ports"), f"{name} must not publish ports"
    loopback = {name: [parse_port(p).target for p in services(compose_config)[name]["ports"]]
                for name in ("prometheus", "grafana")}
    assert loopback == {"prometheus": [9090], "grafana": [3000]}


@pytest.mark.parametrize("name", ["model", *GRPC_SERVICES])
def test_builds_reference_existing_dockerfiles_and_copy_sources(compose_config, name):
    build = services(compose_config)[name]["build"]
    context = Path(build["context"])
    assert context.resolve() == REPO_ROOT
    chain = build_stages(build)
    for stage in chain:
        for keyword, args in stage.instructions:
            assert keyword != "ADD", f"{name}: use COPY, not ADD ({args})"
    rules = dockerignore_rules(context / build["dockerfile"])
    assert not dockerignore_allows(rules, "models/smollm2-135m-instruct/model.safetensors")
    assert not dockerignore_allows(rules, ".venv/bin/python")
    for container_path, host_path in copied_paths(chain, context).items():
        assert host_path.exists(), f"{name}: COPY source {host_path} (-> {container_path}) missing"
        source = str(host_path.relative_to(context))
        assert dockerignore_allows(rules, source), f"{name}: {source} is dockerignored"


@pytest.mark.parametrize("name", GRPC_SERVICES)
def test_grpc_services_run_as_non_root_and_listen_on_all_interfaces(compose_config, name):
    chain = build_stages(services(compose_config)[name]["build"])
    user = effective(chain, "USER")
    assert user not in (None, "root", "0", "0:0"), f"{name} runs as root"
    entrypoint = exec_form(effective(chain, "ENTRYPOINT"))
    assert flag_value(entrypoint, "--host") == "0.0.0.0", entrypoint
    assert "--host" not in services(compose_config)[name]["command"]


@pytest.mark.parametrize("name", GRPC_SERVICES)
def test_grpc_healthchecks_use_the_health_script_on_the_served_port(compose_config, name):
    service = services(compose_config)[name]
    test = service["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", HEALTHCHECK_SCRIPT], test
    port = flag_value(service["command"], "--port")
    assert test[3] == f"127.0.0.1:{port}"
    chain = build_stages(service["build"])
    copied = copied_paths(chain, Path(service["build"]["context"]))
    assert copied.get(HEALTHCHECK_SCRIPT) == DEPLOY_DIR / "healthcheck.py"
    assert healthcheck_command(effective(chain, "HEALTHCHECK")) == test[1:]  # image == compose


@pytest.mark.parametrize("name", ["prometheus", "grafana"])
def test_monitoring_services_have_healthchecks_and_pinned_images(compose_config, name):
    service = services(compose_config)[name]
    assert service["healthcheck"]["test"][0] == "CMD"
    image, _, tag = service["image"].rpartition(":")
    assert image and tag and tag != "latest", service["image"]


def test_model_is_mounted_read_only_and_prepared_by_the_model_service(compose_config):
    found = services(compose_config)
    models_dir = REPO_ROOT / "models"
    for name in GRPC_SERVICES:
        mounts = [parse_volume(v) for v in found[name]["volumes"]]
        assert [(m.kind, m.target, m.read_only) for m in mounts] == [("bind", MODEL_TARGET, True)]
        assert Path(mounts[0].source) == models_dir / Path(MODEL_TARGET).name
        assert flag_value(found[name]["command"], "--model") == MODEL_TARGET
    model = found["model"]
    writable = [parse_volume(v) for v in model["volumes"]]
    assert [(m.kind, Path(m.source), m.target, m.read_only) for m in writable] == [
        ("bind", models_dir, "/models", False)]
    assert flag_value(model["command"], "--out") == MODEL_TARGET
    chain = build_stages(model["build"])
    assert exec_form(effective(chain, "ENTRYPOINT")) == ["python", "-m", "engine_svc.convert_gguf"]


def test_named_volumes_are_declared_and_bind_sources_exist(compose_config):
    declared = set(compose_config.get("volumes") or {})
    used = set()
    for name, service in services(compose_config).items():
        for mount in map(parse_volume, service.get("volumes", [])):
            if mount.kind == "volume":
                used.add(mount.source)
            elif not Path(mount.source).is_relative_to(REPO_ROOT / "models"):
                assert Path(mount.source).exists(), f"{name}: bind source {mount.source} missing"
    assert used == declared


def conditions(service: dict[str, Any]) -> dict[str, str]:
    """depends_on as {service: condition} (compose v2 adds keys such as `required`)."""
    return {name: spec["condition"] for name, spec in service.get("depends_on", {}).items()}


def test_dependencies_wait_for_health_and_the_model(compose_config):
    found = services(compose_config)
    assert conditions(found["tokenizer"]) == {"engine": "service_healthy"}
    assert conditions(found["tokenizer-cpu"]) == {"engine-cpu": "service_healthy"}
    for name in ENGINES:
        assert conditions(found[name]) == {"model": "service_completed_successfully"}
    assert conditions(found["grafana"]) == {"prometheus": "service_healthy"}


def test_gpu_engine_reserves_an_nvidia_gpu_and_cpu_engine_does_not(compose_config):
    found = services(compose_config)
    devices = found["engine"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert flag_value(found["engine"]["command"], "--device") == "cuda"
    assert "deploy" not in found["engine-cpu"]
    assert flag_value(found["engine-cpu"]["command"], "--device") == "cpu"


def test_cpu_variants_answer_to_the_gpu_variants_names(compose_config):
    found = services(compose_config)
    for variant, alias in ALIAS.items():
        assert alias in aliases(found[variant])
    for name in TOKENIZERS:
        host, _, port = flag_value(found[name]["command"], "--engine").rpartition(":")
        assert host == "engine"
        for engine in ENGINES:
            assert port == flag_value(found[engine]["command"], "--port")


def test_prometheus_scrapes_every_metrics_port_by_service_name(compose_config):
    found = services(compose_config)
    prometheus = found["prometheus"]
    config_path = flag_value(prometheus["command"], "--config.file")
    mounts = {m.target: m for m in map(parse_volume, prometheus["volumes"])}
    assert Path(mounts[config_path].source) == DEPLOY_DIR / "prometheus.yml"
    assert mounts[config_path].read_only
    jobs = load_yaml(DEPLOY_DIR / "prometheus.yml")["scrape_configs"]
    targets = {target for job in jobs for group in job["static_configs"]
               for target in group["targets"]}
    for gpu_name, cpu_name in (("engine", "engine-cpu"), ("tokenizer", "tokenizer-cpu")):
        port = flag_value(found[gpu_name]["command"], "--metrics-port")
        assert port == flag_value(found[cpu_name]["command"], "--metrics-port")
        assert str(port) in [str(p) for p in found[gpu_name]["expose"]]
        address = f"{gpu_name}:{port}"
        assert address in targets, f"prometheus.yml does not scrape {address}"
        assert gpu_name in names_of(compose_config, gpu_name) & names_of(compose_config, cpu_name)


def test_grafana_provisions_the_prometheus_datasource_and_dashboards(compose_config):
    grafana = services(compose_config)["grafana"]
    mounts = {m.target: m for m in map(parse_volume, grafana["volumes"])}
    provisioning = mounts["/etc/grafana/provisioning"]
    assert Path(provisioning.source) == DEPLOY_DIR / "grafana" / "provisioning"
    datasources = load_yaml(DEPLOY_DIR / "grafana/provisioning/datasources/prometheus.yml")
    [source] = datasources["datasources"]
    listen = flag_value(services(compose_config)["prometheus"]["command"], "--web.listen-address")
    assert source["type"] == "prometheus"
    assert source["url"] == f"http://prometheus{listen}"
    providers = load_yaml(DEPLOY_DIR / "grafana/provisioning/dashboards/llmserve.yml")["providers"]
    [provider] = providers
    dashboards = mounts[provider["options"]["path"]]
    assert Path(dashboards.source) == DEPLOY_DIR / "grafana" / "dashboards"
    assert (Path(dashboards.source) / "llmserve.json").is_file()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == provider["options"]["path"] + "/llmserve.json"
