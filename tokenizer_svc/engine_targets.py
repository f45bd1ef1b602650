"""`--engine`: one HOST:PORT, a comma-separated list of them, or dns:///NAME:PORT (a name
re-resolved periodically: a Kubernetes headless Service has one A record per engine pod)."""
from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

DNS_SCHEME = "dns:///"


@dataclass(slots=True, frozen=True)
class EngineTargets:
    """Where the engines are: fixed addresses, or a DNS name and port to resolve."""

    addresses: tuple[str, ...] = ()
    dns_name: str | None = None
    dns_port: int = 0

    @property
    def is_dns(self) -> bool:
        return self.dns_name is not None

    def describe(self) -> str:
        return (f"{DNS_SCHEME}{self.dns_name}:{self.dns_port}" if self.is_dns
                else ",".join(self.addresses))


def _split_host_port(target: str, flag_value: str) -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"--engine takes HOST:PORT, a comma-separated list of them or "
                         f"{DNS_SCHEME}NAME:PORT; {target!r} in {flag_value!r} is not HOST:PORT")
    return host, int(port)


def parse_engine_targets(value: str) -> EngineTargets:
    """Parse --engine; ValueError naming the flag and the bad part."""
    value = value.strip()
    if value.startswith("dns:"):
        if not value.startswith(DNS_SCHEME):
            raise ValueError(f"--engine: only {DNS_SCHEME}NAME:PORT is supported (no DNS "
                             f"server authority), got {value!r}")
        host, port = _split_host_port(value[len(DNS_SCHEME):], value)
        return EngineTargets(dns_name=host, dns_port=port)
    addresses = [part.strip() for part in value.split(",") if part.strip()]
    if not addresses:
        raise ValueError("--engine must name at least one HOST:PORT")
    for address in addresses:
        _split_host_port(address, value)
    if len(set(addresses)) != len(addresses):
        raise ValueError(f"--engine lists an address twice: {value!r}")
    return EngineTargets(addresses=tuple(addresses))


def format_address(ip: str, port: int) -> str:
    """ip:port, with IPv6 addresses in brackets (as gRPC targets want them)."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


async def resolve(name: str, port: int) -> list[str]:
    """Every address `name` resolves to now (the event loop's getaddrinfo), sorted; OSError
    when the name does not resolve."""
    infos = await asyncio.get_running_loop().getaddrinfo(name, port, type=socket.SOCK_STREAM)
    return sorted({format_address(str(info[4][0]), port) for info in infos})
