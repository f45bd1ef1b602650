"""llama.cpp's llama-server as a benchmark peer: start it on loopback, send /completion requests
(token-id prompts, greedy, ignore_eos, n_predict, no prompt cache) and time them like
bench/serve.py times llmserve's gRPC stream (RequestRecord, so serve_report summarizes both)."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import free_port
from bench.serve import RequestRecord


@dataclass(slots=True)
class LlamaServerConfig:
    """How one llama-server is started."""

    binary: Path
    gguf: Path
    slots: int             # -np: requests decoded together
    ctx_per_slot: int      # tokens of context each slot holds
    threads: int
    log_dir: Path


class LlamaServer:
    """A llama-server process on a free loopback port; a context manager that stops it."""

    def __init__(self, config: LlamaServerConfig) -> None:
        self.config = config
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        config.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = config.log_dir / f"llama-server-{config.gguf.stem}-np{config.slots}.log"
        cmd = [str(config.binary), "-m", str(config.gguf), "--host", "127.0.0.1",
               "--port", str(port), "-t", str(config.threads), "-tb", str(config.threads),
               "-np", str(config.slots), "-c", str(config.slots * config.ctx_per_slot),
               "-ngl", "0", "--cache-ram", "0", "--no-webui"]
        self.command = cmd
        env = dict(os.environ, OMP_NUM_THREADS=str(config.threads))
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Until /health answers 200 (the model is loaded); raises if the process died."""
        import httpx2 as httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.process.returncode}:\n"
                                   f"{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"llama-server not ready after {timeout_s} s; log: {self.log_path}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> "LlamaServer":
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def server_version(binary: Path) -> str:
    """`llama-server --version` (build number and commit), or why it could not be read."""
    try:
        done = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.SubprocessError) as error:
        return f"unknown ({error})"
    lines = [ln for ln in (done.stdout + done.stderr).splitlines() if "version" in ln.lower()]
    return lines[0].strip() if lines else "unknown"


async def send_completion(client, url: str, prompt_ids: list[int], n_predict: int) -> RequestRecord:
    """One streamed /completion call: greedy, ignore_eos, exactly n_predict tokens, no cache."""
    body = {"prompt": prompt_ids, "n_predict": n_predict, "ignore_eos": True,
            "temperature": 0.0, "cache_prompt": False, "stream": True}
    record = RequestRecord(prompt_tokens=len(prompt_ids))
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url + "/completion", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                raise RuntimeError(f"HTTP {response.status_code}: {text[:200]}")
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                now = time.perf_counter()
                chunk = json.loads(line[6:])
                if chunk.get("content") or chunk.get("tokens"):
                    if record.ttft_s == 0.0:
                        record.ttft_s = now - start
                    else:
                        record.itl_s.append(now - last)
                    last = now
                if chunk.get("stop"):
                    record.output_tokens = int(chunk.get("tokens_predicted", 0))
                    record.prompt_tokens = int(chunk.get("tokens_evaluated", len(prompt_ids)))
                    record.finish_reason = str(chunk.get("stop_type", "stop"))
    except Exception as error:  # noqa: BLE001  (a failed request is a result)
        record.error = f"{type(error).__name__}: {error}"
    record.e2e_s = time.perf_counter() - start
    return record


async def run_completions(url: str, prompts: list[list[int]], concurrency: int,
                          n_predict: int) -> tuple[list[RequestRecord], float]:
    """Every prompt, at most `concurrency` in flight; the records and the wall time."""
    import httpx2 as httpx

    cap = asyncio.Semaphore(concurrency)
    # a fresh connection per request: llama-server may close a kept-alive one after a stream
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=3600) as client:
        async def limited(ids: list[int]) -> RequestRecord:
            async with cap:
                return await send_completion(client, url, ids, n_predict)

        start = time.perf_counter()
        records = await asyncio.gather(*(limited(ids) for ids in prompts))
        return list(records), time.perf_counter() - start
