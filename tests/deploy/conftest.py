"""Fixtures of the deploy tests: the rendered compose config and the Prometheus binary."""
from __future__ import annotations

from typing import Any

import pytest

from tests.deploy.compose import render_config
from tests.deploy.debian import require_command


@pytest.fixture(scope="session")
def compose_config() -> dict[str, Any]:
    """deploy/docker-compose.yml as `compose config` renders it, both profiles enabled."""
    return render_config()


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    """Path of Debian's `prometheus` server binary (apt-installed when missing)."""
    return require_command("prometheus", "prometheus")
