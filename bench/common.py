"""Shared helpers of the serving benchmarks: thread settings, machine info, latency statistics,
random prompts that survive a tokenizer round trip, and both services started on loopback."""
from __future__ import annotations

import argparse
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


# ---- threads and machine -----------------------------------------------------------------------
def set_threads(num_threads: int, use_torch: bool = True) -> dict[str, int]:
    """Set OMP/MKL_NUM_THREADS (inherited by child processes) and, with `use_torch`, torch's
    intra-op threads in this process; return the settings for the result file."""
    if num_threads < 1:
        raise ValueError(f"--threads must be >= 1, got {num_threads}")
    os.environ["OMP_NUM_THREADS"] = str(num_threads)
    os.environ["MKL_NUM_THREADS"] = str(num_threads)
    settings: dict[str, int] = {"OMP_NUM_THREADS": num_threads}
    if use_torch:
        import torch

        torch.set_num_threads(num_threads)
        settings["torch_num_threads"] = torch.get_num_threads()
        settings["torch_num_interop_threads"] = torch.get_num_interop_threads()
    return settings


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, text=True,
                              capture_output=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info() -> dict[str, object]:
    """Device, versions, load and the command line, for a result file."""
    info: dict[str, object] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average_1m_at_start": os.getloadavg()[0],
    }
    for module in ("torch", "transformers", "grpc", "numpy"):
        if module in sys.modules:
            info[f"{module}_version"] = getattr(sys.modules[module], "__version__", "?")
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ---- other load on the machine ------------------------------------------------------------------
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy since boot (/proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / _TICK


def proc_table(include_reaped: bool = False) -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds so far), for every live process; with include_reaped,
    each process's seconds also count its children that have exited."""
    table: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            rest = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        ticks = int(rest[11]) + int(rest[12])
        if include_reaped:
            ticks += int(rest[13]) + int(rest[14])
        table[int(entry.name)] = (int(rest[1]), ticks / _TICK)
    return table


def tree_cpu_s(table: dict[int, tuple[int, float]], root_pid: int) -> float:
    """CPU seconds of `root_pid` and every live descendant in a `proc_table`."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root_pid]
    while todo:
        pid = todo.pop()
        total += table.get(pid, (0, 0.0))[1]
        todo.extend(children.get(pid, []))
    return total


def _tree_cpu_s(root_pid: int) -> float:
    """CPU seconds used so far by `root_pid` and every live descendant."""
    return tree_cpu_s(proc_table(), root_pid)


class OtherLoad:
    """Context manager: CPU cores that processes outside this process tree kept busy meanwhile.

    On a shared machine a result taken while others_cores is well above 0 is not trustworthy.
    """

    def __init__(self) -> None:
        self.others_cores = 0.0
        self.ours_cores = 0.0

    def __enter__(self) -> "OtherLoad":
        self._start = (time.perf_counter(), machine_busy_s(), _tree_cpu_s(os.getpid()))
        return self

    def __exit__(self, *exc: object) -> None:
        wall, busy, ours = self._start
        elapsed = max(time.perf_counter() - wall, 1e-9)
        ours_s = _tree_cpu_s(os.getpid()) - ours
        self.ours_cores = ours_s / elapsed
        self.others_cores = max(0.0, (machine_busy_s() - busy - ours_s) / elapsed)


def add_quiet_machine_args(parser: argparse.ArgumentParser, unit: str) -> None:
    """--max-others / --retries / --quiet-wait: measure on an idle shared machine, per `unit`
    ("run", "method") of the tool; used with wait_for_quiet and OtherLoad."""
    parser.add_argument("--max-others", type=float, default=None, metavar="CORES",
                        help=f"shared machine: wait for an idle machine before each {unit} and "
                             f"measure again when other processes kept more than CORES busy "
                             f"meanwhile")
    parser.add_argument("--retries", type=int, default=3, help="with --max-others (default 3)")
    parser.add_argument("--quiet-wait", type=float, default=900.0,
                        help="seconds to wait for an idle machine before each try (default 900)")


def wait_for_quiet(max_wait_s: float = 600.0, busy_below: float = 0.3, window_s: float = 5.0,
                   windows: int = 3) -> bool:
    """Wait until the machine was idle (< busy_below cores) for `windows` windows in a row.

    Call it while this process is idle; returns False when max_wait_s passed first.
    """
    deadline, quiet = time.monotonic() + max_wait_s, 0
    while time.monotonic() < deadline:
        before = machine_busy_s()
        time.sleep(window_s)
        quiet = quiet + 1 if (machine_busy_s() - before) / window_s < busy_below else 0
        if quiet >= windows:
            return True
    return False


# ---- statistics ----------------------------------------------------------------------------------
def summarize_ms(seconds: Sequence[float]) -> dict[str, float]:
    """mean / p50 / p90 / p99 / max of durations given in seconds, in milliseconds."""
    if len(seconds) == 0:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0, "count": 0}
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    return {"mean": float(ms.mean()), "p50": float(np.percentile(ms, 50)),
            "p90": float(np.percentile(ms, 90)), "p99": float(np.percentile(ms, 99)),
            "max": float(ms.max()), "count": int(ms.size)}


# ---- prompts -------------------------------------------------------------------------------------
def stable_prompt_ids(encode: Callable[[str], list[int]], decode: Callable[[list[int]], str],
                      rng: np.random.Generator, length: int, id_low: int, id_high: int,
                      max_rounds: int = 8) -> tuple[str, list[int]]:
    """Random token ids -> text whose encoding is exactly `length` ids that decode back to it.

    Random ids rarely survive decode/encode unchanged, so the text is re-encoded, cut or padded
    to `length` and decoded again until encode(decode(ids)) == ids.
    """
    if length < 1:
        raise ValueError(f"input length must be >= 1, got {length}")
    ids = [int(t) for t in rng.integers(id_low, id_high, size=length)]
    for _ in range(max_rounds):
        text = decode(ids)
        again = encode(text)
        if again == ids:
            return text, ids
        if len(again) < length:
            again += [int(t) for t in rng.integers(id_low, id_high, size=length - len(again))]
        ids = again[:length]
    text = decode(ids)
    return text, encode(text)  # close to `length`; callers report the real count


# ---- services on loopback -----------------------------------------------------------------------
_handed_out_ports: set[int] = set()


def _ephemeral_low() -> int:
    """The first port the kernel hands to outgoing connections (Linux; else IANA's 49152)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as ports:
            return int(ports.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 49152


def free_port() -> int:
    """A loopback port that binds now, for a service started right after. Chosen below the
    ephemeral range: a bind(0) port comes from that range, where any client connection's source
    port can take it before the service binds (seen as 'Address already in use' in tests)."""
    low = _ephemeral_low()
    candidates = random.Random().sample(range(max(1024, low - 16384), low), 64)
    for port in candidates:
        if port in _handed_out_ports:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out_ports.add(port)
        return port
    with socket.socket() as sock:   # that whole range busy: let the kernel pick
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(slots=True)
class ServiceProcess:
    """One started service process and where it listens."""

    name: str
    process: subprocess.Popen
    address: str
    log_path: Path

    def wait_serving(self, timeout_s: float = 300.0) -> None:
        from grpc_health.v1 import health_pb2

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n"
                                   f"{self.log_path.read_text()[-3000:]}")
            if health_status(self.address) == health_pb2.HealthCheckResponse.SERVING:
                return
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} not SERVING after {timeout_s} s; log: {self.log_path}")

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def health_status(address: str, timeout_s: float = 1.0) -> int | None:
    """grpc.health.v1 status of the whole server at `address`, None when unreachable."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s).status
        except grpc.RpcError:
            return None


def _spawn(name: str, args: list[str], log_dir: Path, threads: int, address: str) -> ServiceProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    log_path = log_dir / f"{name}-{address.rsplit(':', 1)[1]}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", *args], cwd=REPO_ROOT, env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
    return ServiceProcess(name, process, address, log_path)


class Services:
    """Engine + tokenizer service on free loopback ports (gRPC `address`, OpenAI HTTP
    `http_url`); a context manager that stops both."""

    def __init__(self, model: str | Path, engine_args: Sequence[str], threads: int,
                 log_dir: Path) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        engine_address = f"127.0.0.1:{free_port()}"
        self.engine = _spawn("engine", [
            "engine_svc", "--model", str(model), "--port", engine_address.rsplit(":", 1)[1],
            "--metrics-port", "-1", "--log-level", "WARNING", *engine_args],
            log_dir, threads, engine_address)
        self.tokenizer: ServiceProcess | None = None
        try:
            self.engine.wait_serving()
            address = f"127.0.0.1:{free_port()}"
            self.http_url = f"http://127.0.0.1:{free_port()}"
            self.tokenizer = _spawn("tokenizer", [
                "tokenizer_svc", "--model", str(model), "--engine", engine_address,
                "--port", address.rsplit(":", 1)[1], "--metrics-port", "-1",
                "--http-port", self.http_url.rsplit(":", 1)[1]],
                log_dir, threads, address)
            self.tokenizer.wait_serving()
        except BaseException:
            self.close()
            raise

    @property
    def address(self) -> str:
        """The public TextGeneration address (tokenizer service)."""
        assert self.tokenizer is not None
        return self.tokenizer.address

    def close(self) -> None:
        if self.tokenizer is not None:
            self.tokenizer.stop()
        self.engine.stop()

    def __enter__(self) -> "Services":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
