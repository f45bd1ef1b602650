"""Install the Debian packages the deploy tests run (docker-compose, prometheus) when missing."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

APT_TIMEOUT_S = 900
_apt_state = {"updated": False}


def _as_root(command: list[str]) -> list[str] | None:
    """`command` as root: directly, through passwordless sudo, or None when neither works."""
    if os.geteuid() == 0:
        return command
    sudo = shutil.which("sudo")
    if sudo and subprocess.run([sudo, "-n", "true"], capture_output=True).returncode == 0:
        return [sudo, "-n", *command]
    return None


def _run_apt(args: list[str]) -> tuple[bool, str]:
    """Run apt-get non-interactively; (succeeded, last lines of output)."""
    command = _as_root(["apt-get", "-o", "DPkg::Lock::Timeout=300", "-y", "-q", *args])
    if command is None:
        return False, "not root and no passwordless sudo"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True,
                              timeout=APT_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as error:
        return False, f"{' '.join(command)}: {error}"
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
    return proc.returncode == 0, tail


def apt_install(package: str) -> tuple[bool, str]:
    """`apt-get install --no-install-recommends package`, after one `apt-get update` per session."""
    if shutil.which("apt-get") is None:
        return False, "no apt-get on this machine"
    if not _apt_state["updated"]:
        ok, detail = _run_apt(["update"])
        if not ok:
            return False, f"apt-get update failed: {detail}"
        _apt_state["updated"] = True
    return _run_apt(["install", "--no-install-recommends", package])


def require_command(command: str, package: str) -> str:
    """Path of `command`, installing Debian `package` if needed; skip the test if impossible."""
    found = shutil.which(command)
    if found:
        return found
    ok, detail = apt_install(package)
    found = shutil.which(command)
    if found:
        return found
    pytest.skip(f"`{command}` is not installed and `apt-get install -y {package}` "
                f"{'succeeded but did not provide it' if ok else 'failed'}: {detail}")
