"""A real Prometheus server on loopback for tests: config from deploy/prometheus.yml, HTTP API."""
from __future__ import annotations

import copy
import json
import math
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml

from tests.e2e.services import free_port, stop_process

T = TypeVar("T")


class PromQLError(AssertionError):
    """Prometheus answered a query with status "error"."""


def loopback_scrape_config(source: dict[str, Any], ports: dict[str, int],
                           interval: str = "1s") -> dict[str, Any]:
    """`source` with every target `HOST:PORT` rewritten to 127.0.0.1:ports[HOST], short intervals.

    Job names, labels and everything else are kept. A target host missing from `ports` is a
    ValueError naming it (the deploy config scrapes something the test does not run).
    """
    config = copy.deepcopy(source)
    config["global"] = {**config.get("global", {}), "scrape_interval": interval,
                        "scrape_timeout": interval, "evaluation_interval": interval}
    for job in config["scrape_configs"]:
        job.pop("scrape_interval", None)
        job.pop("scrape_timeout", None)
        for group in job["static_configs"]:
            rewritten = []
            for target in group["targets"]:
                host = target.rpartition(":")[0]
                if host not in ports:
                    raise ValueError(f"job {job['job_name']}: target {target!r} is none of "
                                     f"the services the test runs ({sorted(ports)})")
                rewritten.append(f"127.0.0.1:{ports[host]}")
            group["targets"] = rewritten
    return config


def finite_values(result: list[dict[str, Any]]) -> list[float]:
    """All finite sample values of an instant (`value`) or range (`values`) query result."""
    samples = []
    for series in result:
        pairs = series.get("values") or [series["value"]]
        samples += [float(value) for _, value in pairs]
    return [v for v in samples if math.isfinite(v)]


@dataclass
class PrometheusServer:
    """One `prometheus` process listening on 127.0.0.1:port."""

    process: subprocess.Popen
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self, path: str, **params: Any) -> Any:
        """GET /api/v1/<path>; the `data` field, or PromQLError with Prometheus's message."""
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as reply:
                body = json.load(reply)
        except urllib.error.HTTPError as error:
            body = json.loads(error.read() or b"{}")
        if body.get("status") != "success":
            raise PromQLError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.api("query", query=expr)["result"]

    def query_range(self, expr: str, start: float, end: float, step: str = "1s"
                    ) -> list[dict[str, Any]]:
        return self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}",
                        step=step)["result"]

    def wait_until(self, probe: Callable[[], T | None], what: str, timeout: float = 60.0) -> T:
        """Poll `probe` until it returns a value other than None; TimeoutError naming `what`."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited ({self.process.returncode}):\n"
                                   f"{self.log_path.read_text()[-3000:]}")
            try:
                found = probe()
            except (OSError, PromQLError):
                found = None
            if found is not None:
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(f"prometheus: {what} not seen within {timeout} s")
            time.sleep(0.25)

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool | None:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as reply:
                return True if reply.status == 200 else None
        self.wait_until(ready, "/-/ready", timeout)

    def stop(self, timeout: float = 15.0) -> None:
        stop_process(self.process, timeout)


def start_prometheus(binary: str, config: dict[str, Any], work_dir: Path,
                     port: int | None = None) -> PrometheusServer:
    """Write `config`, start `binary` on a loopback port with its own TSDB under work_dir."""
    port = port or free_port()
    config_path = work_dir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    log_path = work_dir / "prometheus.log"
    args = [binary, f"--config.file={config_path}", f"--storage.tsdb.path={work_dir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
    with open(log_path, "w") as log:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(args, cwd=work_dir, stdout=log, stderr=subprocess.STDOUT)
    return PrometheusServer(process, port, log_path)
