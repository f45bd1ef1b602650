"""Render deploy/docker-compose.yml with the real compose CLI and read its normalised form."""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.debian import require_command

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY_DIR = REPO_ROOT / "deploy"
COMPOSE_FILE = DEPLOY_DIR / "docker-compose.yml"
PROFILES = ("gpu", "cpu")
# Variables the compose file interpolates; unset so the test sees the documented defaults.
OVERRIDABLE_VARS = ("LLMSERVE_MODELS_DIR", "LLMSERVE_UID", "LLMSERVE_GID", "LLMSERVE_PUBLIC_PORT",
                    "PROMETHEUS_PORT", "GRAFANA_PORT", "GRAFANA_ADMIN_USER",
                    "GRAFANA_ADMIN_PASSWORD", "COMPOSE_FILE", "COMPOSE_PROFILES")


@dataclass(slots=True, frozen=True)
class PublishedPort:
    """One `ports:` entry: host address ('' = all interfaces), host port, container port."""

    host_ip: str
    published: int
    target: int


@dataclass(slots=True, frozen=True)
class Mount:
    """One `volumes:` entry of a service: bind or named volume."""

    kind: str  # "bind" or "volume"
    source: str
    target: str
    read_only: bool


def compose_cli() -> list[str]:
    """`docker compose` (v2 plugin) when it answers, else Debian's `docker-compose` (installed)."""
    try:
        v2 = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if v2.returncode == 0:
            return ["docker", "compose"]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return [require_command("docker-compose", "docker-compose")]


def render_config(compose_file: Path = COMPOSE_FILE) -> dict[str, Any]:
    """`compose -f FILE --profile gpu --profile cpu config`, parsed; raises with compose's error."""
    cli = compose_cli()
    profile_args = [arg for profile in PROFILES for arg in ("--profile", profile)]
    command = [*cli, "-f", str(compose_file), *profile_args, "config"]
    env = {k: v for k, v in os.environ.items() if k not in OVERRIDABLE_VARS}
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stderr}")
    return yaml.safe_load(proc.stdout)


def parse_port(entry: str | int | dict[str, Any]) -> PublishedPort:
    """Normalise short ('127.0.0.1:3000:3000/tcp', '50051:50051') and long port syntax."""
    if isinstance(entry, dict):
        return PublishedPort(str(entry.get("host_ip", "")), int(entry["published"]),
                             int(entry["target"]))
    parts = str(entry).split("/")[0].split(":")
    if len(parts) == 3:
        return PublishedPort(parts[0], int(parts[1]), int(parts[2]))
    if len(parts) == 2:
        return PublishedPort("", int(parts[0]), int(parts[1]))
    raise ValueError(f"port entry {entry!r}: expected [HOST_IP:]PUBLISHED:TARGET")


def parse_volume(entry: str | dict[str, Any]) -> Mount:
    """Normalise short ('SRC:DST[:ro]') and long volume syntax."""
    if isinstance(entry, dict):
        return Mount(entry["type"], str(entry["source"]), entry["target"],
                     bool(entry.get("read_only", False)))
    parts = entry.split(":")
    if len(parts) not in (2, 3):
        raise ValueError(f"volume entry {entry!r}: expected SRC:DST[:MODE]")
    kind = "bind" if parts[0].startswith(("/", ".")) else "volume"
    read_only = len(parts) == 3 and "ro" in parts[2].split(",")
    return Mount(kind, parts[0], parts[1], read_only)


def flag_value(command: list[str], flag: str) -> str | None:
    """The value after `flag` (or of `flag=value`) in an argv list, None when absent."""
    for index, arg in enumerate(command):
        if arg == flag and index + 1 < len(command):
            return command[index + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())
