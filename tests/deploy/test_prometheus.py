"""A real Prometheus scrapes the two services (deploy/prometheus.yml's jobs, loopback targets)
while requests go through the public API; then every Grafana dashboard query is evaluated."""
from __future__ import annotations

import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from tests.deploy.compose import DEPLOY_DIR, load_yaml
from tests.deploy.dashboard import concrete, load_dashboard, panel_queries
from tests.deploy.prom import (PrometheusServer, PromQLError, finite_values,
                               loopback_scrape_config, start_prometheus)
from tests.e2e.services import Service, free_port, start_engine, start_tokenizer

pytestmark = pytest.mark.timeout(300)

PROMPTS = ["The capital of France is", "Write a list of three fruits:", "def add(a, b):",
           "The quick brown fox"]
MAX_NEW_TOKENS = 24
RATE_WINDOW = "30s"
FRONTEND_REQUESTS = "sum(llmserve_frontend_requests_total)"
ENGINE_FINISHED = "sum(llmserve_requests_finished_total)"
GENERATED = "sum(llmserve_generation_tokens_total)"
COUNTERS = (FRONTEND_REQUESTS, ENGINE_FINISHED, GENERATED)
JOBS = [job["job_name"] for job in load_yaml(DEPLOY_DIR / "prometheus.yml")["scrape_configs"]]


@dataclass(slots=True)
class LoadWindow:
    """When the requests ran and how they ended (gRPC status names, lower case)."""

    start: float
    end: float
    statuses: list[str]


@dataclass(slots=True)
class Monitored:
    """The services under test, the Prometheus scraping them, and the load they served."""

    engine: Service
    tokenizer: Service
    prometheus: PrometheusServer
    load: LoadWindow
    before: dict[str, float]  # COUNTERS before the load (the engine's warm-up counts too)


def generate(address: str, prompt: str, temperature: float = 0.0) -> str:
    """One public Generate call to the end; its final status name in lower case."""
    from llmserve.v1 import generate_pb2, generate_pb2_grpc

    request = generate_pb2.GenerateRequest(
        prompt=prompt, sampling=generate_pb2.SamplingParams(temperature=temperature),
        stopping=generate_pb2.StoppingCriteria(max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True))
    with grpc.insecure_channel(address) as channel:
        stub = generate_pb2_grpc.TextGenerationStub(channel)
        try:
            for _ in stub.Generate(request, timeout=120):
                pass
        except grpc.RpcError as error:
            return error.code().name.lower()
    return "ok"


def drive_load(address: str) -> LoadWindow:
    """A bad request, concurrent prompts, then the same prompts again (prefix-cache hits)."""
    start = time.time()
    statuses = [generate(address, PROMPTS[0], temperature=-1.0)]
    with ThreadPoolExecutor(max_workers=len(PROMPTS)) as pool:
        statuses += list(pool.map(lambda p: generate(address, p), PROMPTS))
        statuses += list(pool.map(lambda p: generate(address, p), PROMPTS[:2]))
    return LoadWindow(start, time.time(), statuses)


@pytest.fixture(scope="module")
def monitored(default_model_dir, prometheus_binary, tmp_path_factory):
    work = tmp_path_factory.mktemp("prometheus")
    engine = start_engine(default_model_dir, work)
    tokenizer = prometheus = None
    try:
        engine.wait_serving()
        tokenizer = start_tokenizer(default_model_dir, engine.address, work)
        tokenizer.wait_serving()
        prom_port = free_port()
        ports = {"engine": engine.metrics_port, "tokenizer": tokenizer.metrics_port,
                 "localhost": prom_port}
        config = loopback_scrape_config(load_yaml(DEPLOY_DIR / "prometheus.yml"), ports)
        prometheus = start_prometheus(prometheus_binary, config, work, prom_port)
        prometheus.wait_ready()
        prometheus.wait_until(lambda: all_up(prometheus) or None, "every target up")
        before = {expr: scalar(prometheus, expr) for expr in COUNTERS}
        load = drive_load(tokenizer.address)
        # Settled: the last scrape of each service has seen every request end.
        wait_increase(prometheus, FRONTEND_REQUESTS, before, len(load.statuses))
        wait_increase(prometheus, ENGINE_FINISHED, before, load.statuses.count("ok"))
        yield Monitored(engine, tokenizer, prometheus, load, before)
    finally:
        if prometheus is not None:
            prometheus.stop()
        if tokenizer is not None:
            tokenizer.stop()
        engine.stop()


def all_up(prometheus: PrometheusServer) -> bool:
    up = {series["metric"]["job"]: float(series["value"][1]) for series in prometheus.query("up")}
    return set(up) == set(JOBS) and all(value == 1.0 for value in up.values())


def scalar(prometheus: PrometheusServer, expr: str) -> float:
    return sum(finite_values(prometheus.query(expr)))


def wait_increase(prometheus: PrometheusServer, expr: str, before: dict[str, float],
                  count: int) -> None:
    def increased() -> bool | None:
        return True if scalar(prometheus, expr) - before[expr] == count else None
    prometheus.wait_until(increased, f"{expr} up by {count}")


def test_every_job_of_the_deploy_config_is_up(monitored):
    up = {s["metric"]["job"]: float(s["value"][1]) for s in monitored.prometheus.query("up")}
    assert up == {job: 1.0 for job in JOBS}
    assert {"llmserve-engine", "llmserve-tokenizer"} <= set(up)


def test_requests_went_through_the_public_api(monitored):
    statuses = monitored.load.statuses
    assert statuses == ["invalid_argument"] + ["ok"] * (len(PROMPTS) + 2)


def test_kv_pool_usage_ratio_is_scraped_from_the_engine(monitored):
    series = monitored.prometheus.query("llmserve_kv_pool_usage_ratio")
    assert [s["metric"]["job"] for s in series] == ["llmserve-engine"]
    assert 0.0 <= float(series[0]["value"][1]) <= 1.0
    during_load = monitored.prometheus.query_range(
        "llmserve_kv_pool_usage_ratio", monitored.load.start, monitored.load.end + 2)
    assert max(finite_values(during_load)) > 0.0


def test_generation_token_rate_is_positive(monitored):
    expr = f"rate(llmserve_generation_tokens_total[{RATE_WINDOW}]) > 0"
    series = monitored.prometheus.wait_until(
        lambda: monitored.prometheus.query(expr) or None, expr, timeout=20)
    assert all(float(s["value"][1]) > 0 for s in series)
    generated = scalar(monitored.prometheus, GENERATED) - monitored.before[GENERATED]
    assert generated == monitored.load.statuses.count("ok") * MAX_NEW_TOKENS


@pytest.fixture(scope="module")
def dashboard_results(monitored: Monitored) -> dict[tuple[str, str], list | PromQLError]:
    """(panel, refId) -> range-query result from the load's start to now (as Grafana asks),
    or the error Prometheus gave for the instant or the range query."""
    results: dict[tuple[str, str], list | PromQLError] = {}
    start, end = monitored.load.start - 2, time.time()
    for query in panel_queries(load_dashboard()):
        expr = concrete(query.expr)
        try:
            monitored.prometheus.query(expr)
            results[(query.panel, query.ref_id)] = monitored.prometheus.query_range(
                expr, start, end)
        except PromQLError as error:
            results[(query.panel, query.ref_id)] = error
    return results


def test_every_dashboard_query_evaluates_and_returns_data(dashboard_results):
    assert len(dashboard_results) == len(panel_queries(load_dashboard()))
    errors = {key: str(r) for key, r in dashboard_results.items() if isinstance(r, PromQLError)}
    assert not errors, f"dashboard queries Prometheus rejected: {errors}"
    empty = [key for key, result in dashboard_results.items() if not finite_values(result)]
    assert not empty, f"dashboard queries without data: {empty}"


def test_dashboard_panels_show_the_load(dashboard_results):
    results = {k: r for k, r in dashboard_results.items() if not isinstance(r, PromQLError)}
    peak = {key: max(finite_values(result), default=float("nan"))
            for key, result in results.items()}
    assert peak[("Generation tokens/s", "A")] > 0
    assert peak[("Tokens/s", "A")] > 0
    assert peak[("KV pool usage", "A")] > 0
    assert peak[("Prefix cache hit rate", "A")] > 0
    assert peak[("Targets up", "A")] == 2
    statuses = {s["metric"]["status"] for s in results[("Frontend requests by status", "A")]}
    assert {"ok", "invalid_argument"} <= statuses
    reasons = {s["metric"]["reason"] for s in results[("Finished requests by reason", "A")]
               if max(finite_values([s])) > 0}
    assert "length" in reasons


def test_promtool_accepts_the_deploy_config(prometheus_binary):
    promtool = Path(prometheus_binary).with_name("promtool")
    if not promtool.exists():
        pytest.skip(f"no promtool next to {prometheus_binary}")
    proc = subprocess.run([str(promtool), "check", "config", str(DEPLOY_DIR / "prometheus.yml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_scrape_config_rewrite_keeps_jobs_and_refuses_unknown_targets():
    source = load_yaml(DEPLOY_DIR / "prometheus.yml")
    ports = {"engine": 1001, "tokenizer": 1002, "localhost": 1003}
    rewritten = loopback_scrape_config(source, ports)
    assert [job["job_name"] for job in rewritten["scrape_configs"]] == JOBS
    targets = {t for job in rewritten["scrape_configs"] for g in job["static_configs"]
               for t in g["targets"]}
    assert targets == {f"127.0.0.1:{port}" for port in ports.values()}
    with pytest.raises(ValueError, match="tokenizer:8001"):
        loopback_scrape_config(source, {"engine": 1001, "localhost": 1003})
