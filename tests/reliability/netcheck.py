"""Which addresses a port listens on (from /proc/net), and this machine's non-loopback IPv4s."""
from __future__ import annotations

import fcntl
import socket
import struct
from pathlib import Path

SIOCGIFADDR = 0x8915
TCP_LISTEN = "0A"


def _ipv4_from_proc(hex_address: str) -> str:
    return socket.inet_ntoa(struct.pack("<I", int(hex_address, 16)))


def _ipv6_from_proc(hex_address: str) -> str:
    words = [struct.pack("<I", int(hex_address[i:i + 8], 16)) for i in range(0, 32, 8)]
    address = socket.inet_ntop(socket.AF_INET6, b"".join(words))
    # gRPC binds 127.0.0.1 as an IPv6 socket on the v4-mapped address: report the IPv4
    return address.removeprefix("::ffff:") if address.startswith("::ffff:") and "." in address \
        else address


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a TCP socket in LISTEN state on `port` (IPv4 and IPv6)."""
    found = set()
    for table, decode in (("/proc/net/tcp", _ipv4_from_proc), ("/proc/net/tcp6", _ipv6_from_proc)):
        path = Path(table)
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if fields[3] == TCP_LISTEN and int(hex_port, 16) == port:
                found.add(decode(address))
    return found


def non_loopback_ipv4() -> list[str]:
    """IPv4 addresses of this machine's interfaces other than 127.0.0.0/8."""
    addresses = []
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                reply = fcntl.ioctl(sock.fileno(), SIOCGIFADDR,
                                    struct.pack("256s", name[:15].encode()))
            except OSError:  # no IPv4 address on this interface
                continue
        address = socket.inet_ntoa(reply[20:24])
        if not address.startswith("127."):
            addresses.append(address)
    return addresses


def connects(host: str, port: int, timeout: float = 2.0) -> bool:
    """True when a TCP connection to host:port is accepted."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
