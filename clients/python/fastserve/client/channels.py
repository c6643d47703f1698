"""Channels to FastServe servers: TLS when a CA is given, the bearer token on every call when one is."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


class _BearerToken(grpc.AuthMetadataPlugin):
    def __init__(self, token: str) -> None:
        self.token = token

    def __call__(self, context, callback) -> None:
        callback((("authorization", f"Bearer {self.token}"),), None)


def make_channel(target: str, *, token: str = "", tls_ca: str = "", client_cert: str = "", client_key: str = "",
                 max_message_mb: int = 64, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A channel to `target`, TLS when `tls_ca` (a PEM file of trusted roots) is given, with
    `authorization: Bearer <token>` on every call when `token` is."""
    options = channel_options(max_message_mb, options)
    if not tls_ca:
        if token:
            # gRPC refuses call credentials on insecure channels; send the header from an interceptor.
            return grpc.intercept_channel(grpc.insecure_channel(target, options), _HeaderInterceptor(token))
        return grpc.insecure_channel(target, options)
    return grpc.secure_channel(target, tls_credentials(tls_ca, client_cert, client_key, token), options)


def channel_options(max_message_mb: int, options: Sequence[tuple[str, Any]] = ()) -> list[tuple[str, Any]]:
    """The message size limits, then `options`: the same for blocking and grpc.aio channels."""
    limit = max_message_mb * 1024 * 1024
    return [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit), *options]


def tls_credentials(tls_ca: str, client_cert: str = "", client_key: str = "",
                    token: str = "") -> grpc.ChannelCredentials:
    """TLS trusting `tls_ca`, mutual with a client certificate when given, and the bearer token as call
    credentials when given (gRPC allows call credentials over TLS only)."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(tls_ca).read_bytes(),
        private_key=Path(client_key).read_bytes() if client_key else None,
        certificate_chain=Path(client_cert).read_bytes() if client_cert else None)
    if token:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.metadata_call_credentials(_BearerToken(token)))
    return credentials


class _HeaderInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                         grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self.header = ("authorization", f"Bearer {token}")

    def _details(self, details):
        return _Details(details, [*(details.metadata or ()), self.header])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


class _Details(grpc.ClientCallDetails):
    def __init__(self, base, metadata) -> None:
        self.method, self.timeout, self.credentials = base.method, base.timeout, base.credentials
        self.wait_for_ready, self.compression = base.wait_for_ready, base.compression
        self.metadata = metadata


def health_status(channel: grpc.Channel, service: str = "", timeout: float = 2.0) -> str:
    """`SERVING`, `NOT_SERVING`, ... as the standard health service reports it; `UNREACHABLE` on error."""
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                           timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.RpcError:
        return "UNREACHABLE"
