"""The HTTP request's id passed on to the gRPC call as `x-request-id` metadata, so that the inference
service's log lines and error details carry the id the HTTP client sees in its response header."""

from __future__ import annotations

import grpc

from fastserve.client import FastServeClient
from fastserve.runtime import logs


class _Details(grpc.ClientCallDetails):
    def __init__(self, base, metadata) -> None:
        self.method, self.timeout, self.credentials = base.method, base.timeout, base.credentials
        self.wait_for_ready, self.compression = base.wait_for_ready, base.compression
        self.metadata = metadata


def call_metadata() -> tuple[tuple[str, str], ...]:
    """The metadata `RequestIdInterceptor` adds, for the async client (`AsyncInferenceClient(metadata=...)`),
    which calls it in the task of the HTTP request."""
    rid = logs.request_id.get()
    return () if rid == "-" else (("x-request-id", rid),)


class RequestIdInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds the current `logs.request_id` (set per HTTP request; worker threads get a copy of the
    context) to every call made outside no request ('-')."""

    def _details(self, details):
        rid = logs.request_id.get()
        if rid == "-":
            return details
        return _Details(details, [*(details.metadata or ()), ("x-request-id", rid)])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)


class GatewayClient(FastServeClient):
    """A `FastServeClient` whose channels pass the request id on."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._tagged: dict[str, grpc.Channel] = {}

    def channel(self, service: str) -> grpc.Channel:
        if service not in self._tagged:
            self._tagged[service] = grpc.intercept_channel(super().channel(service), RequestIdInterceptor())
        return self._tagged[service]

    def close(self) -> None:
        super().close()
        self._tagged.clear()
