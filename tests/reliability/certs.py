"""Throwaway PKI for the TLS tests, made with the `openssl` command line (no Python deps)."""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

LEAF_EXTENSIONS = ("basicConstraints=critical,CA:FALSE\n"
                   "keyUsage=critical,digitalSignature\n"
                   "extendedKeyUsage=serverAuth,clientAuth\n"
                   "subjectAltName=DNS:localhost,IP:127.0.0.1\n")


@dataclass(frozen=True)
class CertPair:
    """A certificate and its private key (PEM files)."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    """One CA, a server and a client certificate it signed, and a client signed by another CA."""

    ca: Path
    server: CertPair
    client: CertPair
    rogue_ca: Path
    rogue_client: CertPair


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ec_key_args(key: Path) -> list[str]:
    return ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key)]


def make_ca(directory: Path, name: str) -> CertPair:
    pair = CertPair(directory / f"{name}.pem", directory / f"{name}.key")
    _openssl("req", "-x509", *_ec_key_args(pair.key), "-out", str(pair.cert), "-days", "2",
             "-subj", f"/CN=llmserve test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)
    return pair


def make_leaf(directory: Path, name: str, ca: CertPair) -> CertPair:
    """A certificate for localhost / 127.0.0.1, usable by a server and by a client."""
    pair = CertPair(directory / f"{name}.pem", directory / f"{name}.key")
    csr, extensions = directory / f"{name}.csr", directory / f"{name}.ext"
    extensions.write_text(LEAF_EXTENSIONS)
    _openssl("req", *_ec_key_args(pair.key), "-out", str(csr), "-subj", "/CN=localhost",
             cwd=directory)
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key),
             "-CAcreateserial", "-out", str(pair.cert), "-days", "2",
             "-extfile", str(extensions), cwd=directory)
    return pair


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca, rogue = make_ca(directory, "ca"), make_ca(directory, "rogue-ca")
    return Pki(ca=ca.cert, server=make_leaf(directory, "server", ca),
                   client=make_leaf(directory, "client", ca), rogue_ca=rogue.cert,
                   rogue_client=make_leaf(directory, "rogue-client", rogue))
