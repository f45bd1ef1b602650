"""The Grafana dashboard's queries, with Grafana's template variables made concrete."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from tests.deploy.compose import DEPLOY_DIR

DASHBOARD = DEPLOY_DIR / "grafana" / "dashboards" / "llmserve.json"
# What Grafana would put in, for a 1 s scrape interval and a short time range.
GRAFANA_VARIABLES = {"__rate_interval": "30s", "__interval": "5s", "__range": "5m",
                     "__interval_ms": "5000", "__range_s": "300"}
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")


@dataclass(slots=True, frozen=True)
class PanelQuery:
    """One target of one panel."""

    panel: str
    ref_id: str
    expr: str
    datasource_uid: str | None


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    return json.loads(path.read_text())


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in (collapsed) rows."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def panel_queries(dashboard: dict[str, Any]) -> list[PanelQuery]:
    queries = []
    for panel in iter_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            source = target.get("datasource") or panel.get("datasource") or {}
            queries.append(PanelQuery(panel["title"], target["refId"], target["expr"],
                                      source.get("uid")))
    return queries


def concrete(expr: str, variables: dict[str, str] = GRAFANA_VARIABLES) -> str:
    """`expr` with $var / ${var} / [[var]] replaced; ValueError for a variable not known."""
    def replace(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group)
        if name not in variables:
            raise ValueError(f"unknown template variable ${name} in {expr!r}")
        return variables[name]
    return _VARIABLE.sub(replace, expr)
