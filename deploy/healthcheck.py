#!/usr/bin/env python3
"""Container health probe: exit 0 only when the gRPC server at HOST:PORT reports SERVING.

Usage: python healthcheck.py HOST:PORT [--service NAME] [--timeout SECONDS]

Asks the standard grpc.health.v1 Health/Check (service "" = the whole server by default).
Exit 0: SERVING. Exit 1: anything else (NOT_SERVING, UNKNOWN, unreachable, timeout, bad
argument), with one line on stderr saying why. Docker reads only 0 (healthy) and 1 (unhealthy).
"""
from __future__ import annotations

import argparse
import sys

HEALTHY = 0
UNHEALTHY = 1


def parse_address(address: str) -> str:
    """Validate HOST:PORT (port in 1..65535) and return it unchanged."""
    host, sep, port = address.rpartition(":")
    if not sep or not host:
        raise ValueError(f"address must be HOST:PORT, got {address!r}")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"address port must be in 1..65535, got {port!r}")
    return address


def probe(address: str, service: str = "", timeout_s: float = 3.0) -> tuple[bool, str]:
    """(serving, status name or error) of `service` at `address` via grpc.health.v1."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as error:
            return False, f"{error.code().name}: {error.details()}"
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="exit 0 only when the gRPC server at HOST:PORT reports SERVING")
    parser.add_argument("address", help="HOST:PORT of the gRPC server")
    parser.add_argument("--service", default="", help='health service name (default "": server)')
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:  # argparse exits 2 on bad usage, which Docker reserves
        return HEALTHY if exit_request.code == 0 else UNHEALTHY
    try:
        address = parse_address(args.address)
        if not args.timeout > 0:
            raise ValueError(f"--timeout must be > 0, got {args.timeout}")
    except ValueError as error:
        print(f"healthcheck: {error}", file=sys.stderr)
        return UNHEALTHY
    serving, detail = probe(address, args.service, args.timeout)
    if not serving:
        print(f"healthcheck: {address} service {args.service!r} is not serving: {detail}",
              file=sys.stderr)
        return UNHEALTHY
    return HEALTHY


if __name__ == "__main__":
    sys.exit(main())
