"""`make run`: start the engine, wait until it is SERVING, then the tokenizer service.

Ctrl-C (or SIGTERM) stops both: the tokenizer first, then the engine, each draining.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def wait_serving(address: str, process: subprocess.Popen, name: str, timeout: float) -> None:
    """Poll grpc.health.v1 until SERVING; fail if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SystemExit(f"{name} exited with code {process.returncode} while starting")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.25)
    raise SystemExit(f"{name} did not become SERVING within {timeout:.0f} s")


def stop(process: subprocess.Popen, name: str) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            print(f"{name} did not stop in time; killing it", file=sys.stderr)
            process.kill()


def banner(args: argparse.Namespace) -> str:
    """What is served where, and how to try it."""
    http = (f"  OpenAI-compatible HTTP: http://{args.host}:{args.http_port}/v1\n"
            if args.http_port else "")
    model = os.path.basename(os.path.normpath(args.model))
    curl = (f"""  curl http://{args.host}:{args.http_port}/v1/chat/completions \\
    -H 'Content-Type: application/json' \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hi!"}}]}}'
""" if args.http_port else "")
    return f"""
llmserve is up.
  public gRPC (llmserve.v1.TextGeneration): {args.host}:{args.port}
{http}  metrics: http://127.0.0.1:{args.metrics_port}/metrics (tokenizer), \
http://127.0.0.1:{args.engine_metrics_port}/metrics (engine)
try it from another terminal:
  .venv/bin/python -m tokenizer_svc.client --server {args.host}:{args.port} --chat \
"Write a haiku about the sea"
{curl}Ctrl-C stops both services.
"""


def main() -> int:
    p = argparse.ArgumentParser(description="Serve a model locally: engine + tokenizer service.")
    p.add_argument("--model", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051, help="public TextGeneration port")
    p.add_argument("--http-port", type=int, default=8000,
                   help="OpenAI-compatible HTTP port of the tokenizer service (0 = off)")
    p.add_argument("--engine-port", type=int, default=50052)
    p.add_argument("--metrics-port", type=int, default=8001, help="tokenizer metrics port")
    p.add_argument("--engine-metrics-port", type=int, default=8002)
    args, engine_extra = p.parse_known_args()
    python = sys.executable
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    engine = subprocess.Popen([python, "-m", "engine_svc", "--model", args.model,
                               "--host", "127.0.0.1", "--port", str(args.engine_port),
                               "--metrics-port", str(args.engine_metrics_port), *engine_extra],
                              env=env)
    tokenizer = None
    try:
        print(f"starting the engine on 127.0.0.1:{args.engine_port} ...", flush=True)
        wait_serving(f"127.0.0.1:{args.engine_port}", engine, "engine", timeout=600)
        tokenizer = subprocess.Popen([python, "-m", "tokenizer_svc", "--model", args.model,
                                      "--engine", f"127.0.0.1:{args.engine_port}",
                                      "--host", args.host, "--port", str(args.port),
                                      "--http-port", str(args.http_port),
                                      "--metrics-port", str(args.metrics_port)], env=env)
        wait_serving(f"{args.host}:{args.port}", tokenizer, "tokenizer service", timeout=120)
        print(banner(args), flush=True)
        while engine.poll() is None and tokenizer.poll() is None:
            time.sleep(0.5)
        print("a service exited; stopping the other", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
        return 0
    finally:
        if tokenizer is not None:
            stop(tokenizer, "tokenizer service")
        stop(engine, "engine")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    sys.exit(main())
