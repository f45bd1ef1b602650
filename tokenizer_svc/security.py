"""Transport security of the tokenizer service: TLS credentials and the optional API key.

- Server TLS: `--tls-cert/--tls-key`; with `--tls-ca` clients must present a certificate
  signed by that CA (mutual TLS).
- Engine client TLS: `--engine-tls-ca` (verify the engine), plus `--engine-tls-cert` and
  `--engine-tls-key` (our client certificate, for an engine started with `--tls-ca`).
- API key: `authorization: Bearer <key>` metadata on every public call; health and reflection
  stay open so probes and tooling work without the key.
"""
from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                        "/grpc.reflection.v1.ServerReflection/")


def _read(path: Path | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


def server_credentials(cert: Path | None, key: Path | None,
                       client_ca: Path | None = None) -> grpc.ServerCredentials | None:
    """TLS credentials for a server (None: plaintext); a client CA makes client certs mandatory."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ValueError("--tls-cert and --tls-key must be given together")
    ca = _read(client_ca)
    return grpc.ssl_server_credentials([(_read(key), _read(cert))], root_certificates=ca,
                                       require_client_auth=ca is not None)


def channel_credentials(ca: Path | None, cert: Path | None = None,
                        key: Path | None = None) -> grpc.ChannelCredentials | None:
    """TLS credentials for a client channel (None: plaintext)."""
    if ca is None and cert is None and key is None:
        return None
    if (cert is None) != (key is None):
        raise ValueError("--engine-tls-cert and --engine-tls-key must be given together")
    return grpc.ssl_channel_credentials(root_certificates=_read(ca), private_key=_read(key),
                                        certificate_chain=_read(cert))


def bearer_matches(metadata: tuple | None, api_key: str) -> bool:
    """True when the call's `authorization` metadata is exactly `Bearer <api_key>`."""
    expected = f"Bearer {api_key}".encode()
    for name, value in metadata or ():
        if name.lower() == "authorization":
            given = value.encode() if isinstance(value, str) else bytes(value)
            return hmac.compare_digest(given, expected)
    return False


def _denied_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that fails with UNAUTHENTICATED."""
    async def deny(request_or_iterator: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kinds: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler]] = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(deny, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without `authorization: Bearer <key>` (health and reflection stay open)."""

    def __init__(self, api_key: str) -> None:
        if not api_key:
            raise ValueError("--api-key must not be empty")
        self._api_key = api_key

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        if bearer_matches(details.invocation_metadata, self._api_key):
            return handler
        return _denied_handler(handler, "missing or wrong API key: send metadata "
                                        "'authorization: Bearer <key>'")
