"""Security: TLS on both servers, mutual TLS tokenizer -> engine, loopback-only binding,
one process per port, and the public API key (health and reflection stay open).

Certificates come from a throwaway CA made with the `openssl` CLI (tests/reliability/certs.py).
"""
from __future__ import annotations

import time

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from llmserve.v1 import engine_pb2, generate_pb2
from tests.reliability.certs import Pki, make_pki
from tests.reliability.harness import (NOT_SERVING, SERVING, Proc, engine_proc, tokenizer_proc)
from tests.reliability.messages import collect, engine_stub, text_request, text_stub
from tests.reliability.netcheck import connects, listening_addresses, non_loopback_ipv4

pytestmark = pytest.mark.timeout(240)

API_KEY = "k3y-for-tests-0123456789"
GOOD = [("authorization", f"Bearer {API_KEY}")]


def credentials(ca, client=None) -> grpc.ChannelCredentials:
    read = lambda path: None if path is None else path.read_bytes()  # noqa: E731
    return grpc.ssl_channel_credentials(
        read(ca), read(client.key) if client else None, read(client.cert) if client else None)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def secure(default_model_dir, log_dir, pki):
    """mTLS engine; tokenizer with TLS on its public port, mTLS to the engine, API key (env)."""
    engine = engine_proc(default_model_dir, log_dir, "--tls-cert", str(pki.server.cert),
                         "--tls-key", str(pki.server.key), "--tls-ca", str(pki.ca),
                         credentials=credentials(pki.ca, pki.client)).spawn()
    tokenizer = tokenizer_proc(
        default_model_dir, engine.address, log_dir, "--tls-cert", str(pki.server.cert),
        "--tls-key", str(pki.server.key), "--engine-tls-ca", str(pki.ca),
        "--engine-tls-cert", str(pki.client.cert), "--engine-tls-key", str(pki.client.key),
        credentials=credentials(pki.ca), env={"LLMSERVE_API_KEY": API_KEY}).spawn()
    try:
        engine.wait_serving()
        tokenizer.wait_serving()
        yield engine, tokenizer
    finally:
        tokenizer.stop()
        engine.stop()


def test_generate_end_to_end_over_tls_and_mtls(secure) -> None:
    engine, tokenizer = secure
    with tokenizer.channel() as channel:
        outcome = collect(text_stub(channel).Generate(text_request("Hello", 6), metadata=GOOD,
                                                      timeout=60))
    assert outcome.code == grpc.StatusCode.OK, outcome.details
    assert len(outcome.token_ids) == 6 and outcome.text
    assert "TLS" in engine.log_text() and "engine at" in tokenizer.log_text()


@pytest.mark.parametrize("who", ["engine", "tokenizer"])
def test_plaintext_clients_are_refused(secure, who: str) -> None:
    target = dict(zip(("engine", "tokenizer"), secure))[who]
    plain = Proc(who, [], target.port, target.metrics_port, target.log_path)
    assert plain.health(timeout=2) is None
    assert target.health() == SERVING


def test_engine_requires_a_client_certificate_signed_by_its_ca(secure, pki) -> None:
    engine, _ = secure
    attempts = {"no client certificate": credentials(pki.ca),
                "certificate of another CA": credentials(pki.ca, pki.rogue_client),
                "signed by the CA": credentials(pki.ca, pki.client)}
    results = {}
    for name, creds in attempts.items():
        with grpc.secure_channel(engine.address, creds) as channel:
            try:
                engine_stub(channel).GetInfo(engine_pb2.GetInfoRequest(), timeout=3)
                results[name] = grpc.StatusCode.OK
            except grpc.RpcError as error:
                results[name] = error.code()
    assert results == {"no client certificate": grpc.StatusCode.UNAVAILABLE,
                       "certificate of another CA": grpc.StatusCode.UNAVAILABLE,
                       "signed by the CA": grpc.StatusCode.OK}


def test_clients_verify_the_server_certificate(secure, pki) -> None:
    _, tokenizer = secure
    impostor_trust = Proc("tokenizer", [], tokenizer.port, 0, tokenizer.log_path,
                          credentials(pki.rogue_ca))
    assert impostor_trust.health(timeout=2) is None


def test_tokenizer_without_a_client_certificate_never_reaches_the_engine(
        secure, default_model_dir, log_dir, pki) -> None:
    engine, _ = secure
    tokenizer = tokenizer_proc(default_model_dir, engine.address, log_dir,
                               "--engine-tls-ca", str(pki.ca)).spawn()
    try:
        tokenizer.wait_health(NOT_SERVING, timeout=30)
        time.sleep(1.0)  # several engine polls later it is still not serving
        assert tokenizer.health() == NOT_SERVING
        with tokenizer.channel() as channel:
            outcome = collect(text_stub(channel).Generate(text_request("Hi", 2), timeout=10))
        assert outcome.code == grpc.StatusCode.UNAVAILABLE, outcome.details
    finally:
        tokenizer.stop()


CALLS = {
    "Generate": lambda stub, md: collect(stub.Generate(text_request("Hi", 2), metadata=md,
                                                       timeout=30)).code,
    "Tokenize": lambda stub, md: stub.Tokenize(generate_pb2.TokenizeRequest(text="hi"),
                                               metadata=md, timeout=10),
    "Detokenize": lambda stub, md: stub.Detokenize(
        generate_pb2.DetokenizeRequest(token_ids=[1, 2]), metadata=md, timeout=10),
    "GetModelInfo": lambda stub, md: stub.GetModelInfo(generate_pb2.GetModelInfoRequest(),
                                                       metadata=md, timeout=10),
}
BAD_KEYS = {"missing": None, "wrong": [("authorization", "Bearer nope")],
            "no Bearer prefix": [("authorization", API_KEY)],
            "prefix of the key": [("authorization", f"Bearer {API_KEY[:-1]}")],
            "key with a suffix": [("authorization", f"Bearer {API_KEY}x")]}


def _status(call, stub, metadata) -> grpc.StatusCode:
    try:
        result = call(stub, metadata)
    except grpc.RpcError as error:
        return error.code()
    return result if isinstance(result, grpc.StatusCode) else grpc.StatusCode.OK


@pytest.mark.parametrize("method", list(CALLS))
def test_api_key_guards_every_public_method(secure, method: str) -> None:
    _, tokenizer = secure
    with tokenizer.channel() as channel:
        stub = text_stub(channel)
        denied = {name: _status(CALLS[method], stub, md) for name, md in BAD_KEYS.items()}
        allowed = _status(CALLS[method], stub, GOOD)
    assert set(denied.values()) == {grpc.StatusCode.UNAUTHENTICATED}, denied
    assert allowed == grpc.StatusCode.OK


def test_health_and_reflection_need_no_key_and_the_key_is_not_on_the_command_line(
        secure) -> None:
    _, tokenizer = secure
    assert tokenizer.health() == SERVING  # no metadata at all
    with tokenizer.channel() as channel:
        replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        names = {s.name for s in next(replies).list_services_response.service}
    assert "llmserve.v1.TextGeneration" in names
    cmdline = open(f"/proc/{tokenizer.process.pid}/cmdline", "rb").read()
    assert API_KEY.encode() not in cmdline


def test_services_bind_loopback_only_by_default(secure) -> None:
    engine, tokenizer = secure
    for proc in (engine, tokenizer):
        for port in (proc.port, proc.metrics_port):
            assert listening_addresses(port) == {"127.0.0.1"}, (proc.name, port)
            assert connects("127.0.0.1", port)
            for address in non_loopback_ipv4():
                assert not connects(address, port), (proc.name, address, port)
    assert f"engine listening on 127.0.0.1:{engine.port}" in engine.log_text()


def test_a_second_engine_cannot_take_the_same_port(secure, default_model_dir, log_dir) -> None:
    engine, _ = secure
    intruder = engine_proc(default_model_dir, log_dir, port=engine.port).spawn()
    try:
        assert intruder.process.wait(timeout=120) == 2
    finally:
        intruder.stop(timeout=5)
    assert "could not bind" in intruder.log_text()
    assert engine.health() == SERVING


def test_cli_client_speaks_tls_and_sends_the_key_from_the_environment(secure, pki) -> None:
    import os
    import subprocess
    import sys

    from tests.e2e.services import REPO_ROOT

    _, tokenizer = secure
    command = [sys.executable, "-m", "tokenizer_svc.client", "--server", tokenizer.address,
               "--tls-ca", str(pki.ca), "--max-new-tokens", "2", "--temperature", "0", "Hi"]
    env = {k: v for k, v in os.environ.items() if k != "LLMSERVE_API_KEY"}
    results = [subprocess.run(command, cwd=REPO_ROOT, env=env | extra, capture_output=True,
                              text=True, timeout=60)
               for extra in ({"LLMSERVE_API_KEY": API_KEY}, {})]
    assert results[0].returncode == 0, results[0].stderr
    assert "finish_reason=LENGTH" in results[0].stderr
    assert results[1].returncode == 1 and "UNAUTHENTICATED" in results[1].stderr


def test_api_key_comes_from_the_flag_or_the_environment(monkeypatch, default_model_dir) -> None:
    from tokenizer_svc.config import config_from_args

    argv = ["--model", str(default_model_dir)]
    monkeypatch.setenv("LLMSERVE_API_KEY", "from-env")
    assert config_from_args(argv).api_key == "from-env"
    assert config_from_args([*argv, "--api-key", "from-flag"]).api_key == "from-flag"
    monkeypatch.setenv("LLMSERVE_API_KEY", "")
    assert config_from_args(argv).api_key is None


@pytest.mark.parametrize("service, flags, message", [
    ("tokenizer_svc", ("--tls-cert", "{cert}"), "--tls-cert and --tls-key must be given together"),
    ("tokenizer_svc", ("--engine-tls-cert", "{cert}", "--engine-tls-ca", "{ca}"),
     "--engine-tls-cert and --engine-tls-key must be given together"),
    ("engine_svc", ("--tls-ca", "{ca}"), "--tls-ca (require client certificates) needs"),
    ("engine_svc", ("--tls-cert", "{cert}", "--tls-key", "/nonexistent.key"),
     "--tls-key /nonexistent.key"),
])
def test_tls_flag_mistakes_stop_the_service_at_startup(default_model_dir, pki, service: str,
                                                       flags: tuple, message: str) -> None:
    import subprocess
    import sys

    from tests.e2e.services import REPO_ROOT

    args = [flag.format(cert=pki.server.cert, ca=pki.ca) for flag in flags]
    result = subprocess.run([sys.executable, "-m", service, "--model", str(default_model_dir),
                             *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr
