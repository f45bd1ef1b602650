"""The Grafana dashboard JSON, statically: structure, datasource, the panels the brief asks for,
and metric names that exist in the services (the live test evaluates every query)."""
from __future__ import annotations

import re

import pytest

from tests.deploy.compose import DEPLOY_DIR, REPO_ROOT, load_yaml
from tests.deploy.dashboard import concrete, iter_panels, load_dashboard, panel_queries

METRIC = re.compile(r"\bllmserve_\w+")
SUFFIXES = ("_bucket", "_sum", "_count", "_total")
QUANTILE = r"histogram_quantile\(0\.\d+, sum by \(le\) \(rate\("
# (what the dashboard must show, a regex one of its queries must match)
REQUIRED = [
    ("KV pool usage", r"llmserve_kv_pool_usage_ratio"),
    ("tokens/s", r"rate\(llmserve_generation_tokens_total\[1m\]\)"),
    ("running requests", r"llmserve_requests_running"),
    ("waiting requests", r"llmserve_requests_waiting"),
    ("TTFT quantiles", QUANTILE + r"llmserve_time_to_first_token_seconds_bucket"),
    ("inter-token latency quantiles", QUANTILE + r"llmserve_inter_token_latency_seconds_bucket"),
    ("preemptions", r"rate\(llmserve_preemptions_total"),
    ("prefix cache hit rate",
     r"llmserve_prefix_cache_hit_tokens_total.*/.*llmserve_prefix_cache_queried_tokens_total"),
    ("finished requests by reason", r"sum by \(reason\) \(rate\(llmserve_requests_finished_total"),
    ("frontend request rate by status",
     r"sum by \(status\) \(rate\(llmserve_frontend_requests_total"),
]


@pytest.fixture(scope="module")
def dashboard():
    return load_dashboard()


def exported_metric_names() -> set[str]:
    """Metric family names registered in the two services' metrics modules."""
    names = set()
    for module in ("engine_svc/metrics.py", "tokenizer_svc/metrics.py"):
        names |= set(re.findall(r'"(llmserve_\w+)"', (REPO_ROOT / module).read_text()))
    return names


def family(series: str) -> str:
    for suffix in SUFFIXES:
        if series.endswith(suffix):
            return series[: -len(suffix)]
    return series


def test_panels_have_unique_ids_and_titles_and_fit_the_grid(dashboard):
    panels = list(iter_panels(dashboard["panels"]))
    for key in ("id", "title"):
        values = [panel[key] for panel in panels]
        assert len(values) == len(set(values)), f"duplicate panel {key}s"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel.get("targets"), f"panel {panel['title']!r} has no query"


def test_every_query_uses_the_provisioned_datasource(dashboard):
    datasources = load_yaml(DEPLOY_DIR / "grafana/provisioning/datasources/prometheus.yml")
    [uid] = [source["uid"] for source in datasources["datasources"]]
    queries = panel_queries(dashboard)
    assert queries
    assert {query.datasource_uid for query in queries} == {uid}


@pytest.mark.parametrize("what, pattern", REQUIRED, ids=[what for what, _ in REQUIRED])
def test_dashboard_shows(dashboard, what, pattern):
    exprs = [query.expr for query in panel_queries(dashboard)]
    assert any(re.search(pattern, expr) for expr in exprs), f"no panel query for {what}"


def test_queries_name_only_metrics_the_services_export(dashboard):
    exported = exported_metric_names()
    assert "llmserve_generation_tokens" in exported  # the scan sees the registrations
    for query in panel_queries(dashboard):
        for series in METRIC.findall(query.expr):
            assert family(series) in exported, f"{query.panel}: unknown metric {series}"


def test_template_variables_are_all_known(dashboard):
    for query in panel_queries(dashboard):
        assert "$" not in concrete(query.expr), query.expr
