"""The HTTP port takes the gRPC port's security: the same API key, the same TLS certificates
(and client certificates with --tls-ca). Fake engine; a throwaway PKI from the openssl CLI."""
from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys

import grpc
import httpx2 as httpx
import openai
import pytest

from tests.frontend.harness import REPLY_TEXT, free_port, running_stack
from tests.frontend.test_http_api import CHAT, MODEL
from tests.reliability.certs import Pki, make_pki

API_KEY = "http-k3y-0123456789"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_api_key_guards_every_route_but_health() -> None:
    async def body() -> None:
        async with running_stack(http_port=free_port(), api_key=API_KEY) as s:
            async with httpx.AsyncClient(base_url=s.http_url) as http:
                calls = [("POST", "/v1/chat/completions", {"model": MODEL, "messages": CHAT}),
                         ("POST", "/v1/completions", {"model": MODEL, "prompt": "x"}),
                         ("GET", "/v1/models", None),
                         ("POST", "/tokenize", {"prompt": "x"}),
                         ("POST", "/detokenize", {"tokens": [1]})]
                for key in (None, "Bearer nope", API_KEY, f"Bearer {API_KEY}x",
                            f"Bearer {API_KEY[:-1]}"):
                    headers = {} if key is None else {"authorization": key}
                    for method, path, body_json in calls:
                        reply = await http.request(method, path, json=body_json,
                                                   headers=headers)
                        assert reply.status_code == 401, (key, path)
                        assert reply.json()["error"]["code"] == "invalid_api_key"
                    assert (await http.get("/health", headers=headers)).status_code == 200
                good = {"authorization": f"Bearer {API_KEY}"}
                for method, path, body_json in calls:
                    reply = await http.request(method, path, json=body_json, headers=good)
                    assert reply.status_code == 200, (path, reply.text)
            api = openai.AsyncOpenAI(base_url=s.http_url + "/v1", api_key=API_KEY,
                                     max_retries=0)
            with pytest.raises(openai.AuthenticationError):
                await openai.AsyncOpenAI(base_url=s.http_url + "/v1", api_key="wrong",
                                         max_retries=0).models.list()
            reply = await api.chat.completions.create(model=MODEL, messages=CHAT)
            assert reply.choices[0].message.content == REPLY_TEXT
    asyncio.run(body())


def _grpc_credentials(pki: Pki, client: bool) -> grpc.ChannelCredentials:
    pair = pki.client if client else None
    return grpc.ssl_channel_credentials(pki.ca.read_bytes(),
                                        pair.key.read_bytes() if pair else None,
                                        pair.cert.read_bytes() if pair else None)


def _context(pki: Pki, client: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if client:
        context.load_cert_chain(str(pki.client.cert), str(pki.client.key))
    return context


def test_tls_and_mutual_tls_on_the_http_port(pki: Pki) -> None:
    async def body() -> None:
        tls = dict(tls_cert=pki.server.cert, tls_key=pki.server.key)
        async with running_stack(http_port=free_port(), credentials=_grpc_credentials(pki, False),
                                 **tls) as s:
            url = f"https://127.0.0.1:{s.frontend.http_port}"
            api = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0,
                                     http_client=httpx.AsyncClient(verify=_context(pki, False)))
            reply = await api.chat.completions.create(model=MODEL, messages=CHAT)
            assert reply.choices[0].message.content == REPLY_TEXT
            async with httpx.AsyncClient() as plain:
                with pytest.raises(httpx.HTTPError):  # plaintext to the TLS port
                    await plain.get(f"http://127.0.0.1:{s.frontend.http_port}/health")
            rogue = ssl.create_default_context(cafile=str(pki.rogue_ca))
            async with httpx.AsyncClient(verify=rogue) as impostor_trust:
                with pytest.raises(httpx.HTTPError):  # the client checks our certificate
                    await impostor_trust.get(url + "/health")
        async with running_stack(http_port=free_port(), tls_ca=pki.ca,
                                 credentials=_grpc_credentials(pki, True), **tls) as s:
            url = f"https://127.0.0.1:{s.frontend.http_port}/health"
            async with httpx.AsyncClient(verify=_context(pki, True)) as with_cert:
                assert (await with_cert.get(url)).status_code == 200
            async with httpx.AsyncClient(verify=_context(pki, False)) as without:
                with pytest.raises(httpx.HTTPError):
                    await without.get(url)
    asyncio.run(body())


def test_http_port_flag_help_range_and_taken_port() -> None:
    from tokenizer_svc.config import FrontendConfig, config_from_args

    assert FrontendConfig(model_dir=".").http_port == 8000
    help_text = subprocess.run([sys.executable, "-m", "tokenizer_svc", "--help"],
                               capture_output=True, text=True, timeout=60).stdout
    assert "--http-port" in help_text and "0 turns it off" in help_text
    assert config_from_args(["--model", ".", "--http-port", "0"]).http_port == 0
    with pytest.raises(ValueError, match="--http-port must be in"):
        config_from_args(["--model", ".", "--http-port", "70000"])

    async def taken() -> None:
        async with running_stack(http_port=free_port()) as s:
            with pytest.raises(RuntimeError, match="cannot bind HTTP to"):
                async with running_stack(http_port=s.frontend.http_port):
                    pass
    asyncio.run(taken())
