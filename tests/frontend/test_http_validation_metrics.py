"""A generation request whose body FastAPI rejects (bad JSON, a field of the wrong type, a missing
field) is a failed request like any other: llmserve_frontend_requests_total{status=
"invalid_argument", protocol="http"} counts it, as it counts a 400 from the core's checks."""
from __future__ import annotations

import asyncio

from tests.frontend.test_http_api import MODEL, client, http_stack

MALFORMED = [
    ("/v1/completions", b"{not json"),
    ("/v1/completions", b'{"model": "fake-model", "prompt": "x", "temperature": "hot"}'),
    ("/v1/chat/completions", b'{"model": "fake-model"}'),   # no messages
    ("/v1/chat/completions", b"[1, 2]"),
]


def test_malformed_generation_bodies_count_as_invalid_argument_http_requests() -> None:
    async def body() -> None:
        async with http_stack() as s:
            metrics = s.frontend.metrics
            invalid = metrics.requests_total.labels("invalid_argument", "http")
            ok = metrics.requests_total.labels("ok", "http")
            raw = client(s)._client  # noqa: SLF001  (the openai client's own httpx client)
            for index, (path, content) in enumerate(MALFORMED, start=1):
                reply = await raw.post(s.http_url + path, content=content,
                                       headers={"content-type": "application/json"})
                assert reply.status_code == 400, reply.text
                assert invalid._value.get() == index, (path, content)  # noqa: SLF001
            tokenize = await raw.post(s.http_url + "/tokenize", json={"prompt": 5})
            assert tokenize.status_code == 400   # not a generation request: not counted
            assert invalid._value.get() == len(MALFORMED)  # noqa: SLF001
            grpc_invalid = metrics.requests_total.labels("invalid_argument", "grpc")
            assert grpc_invalid._value.get() == 0  # noqa: SLF001
            await client(s).completions.create(model=MODEL, prompt="x")
            assert ok._value.get() == 1  # noqa: SLF001
            assert invalid._value.get() == len(MALFORMED)  # noqa: SLF001
    asyncio.run(body())
