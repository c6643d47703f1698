"""A probe service for testing the server runtime itself: raw-bytes methods, no proto needed.

It is registered through the same `create_server` every service uses, so what the tests see (errors,
limits, auth, TLS, shutdown) is what the services do.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import grpc

from fastserve.runtime import errors

SERVICE = "fastserve.test.v1.ProbeService"

RAISES = {
    "invalid": lambda: errors.InvalidArgument("learning_rate must be > 0", field="hyperparameters.learning_rate"),
    "not_found": lambda: errors.NotFound("no model 'x'"),
    "already_exists": lambda: errors.AlreadyExists("model x/1 exists"),
    "failed_precondition": lambda: errors.FailedPrecondition("job ended"),
    "resource_exhausted": lambda: errors.ResourceExhausted("queue full"),
    "unavailable": lambda: errors.Unavailable("model loading"),
    "deadline": lambda: errors.DeadlineExceeded("took too long"),
    "cancelled": lambda: errors.Cancelled("client went away"),
    "bug": lambda: ZeroDivisionError("secret internal detail"),
}


def _echo(request: bytes, context) -> bytes:
    return request


def _sleep(request: bytes, context) -> bytes:
    time.sleep(float(request.decode()))
    return b"slept " + request


def _raise(request: bytes, context) -> bytes:
    raise RAISES[request.decode()]()


def _count(request: bytes, context):
    """Streams `n` numbers, then raises the error named after the colon, if any: `3:not_found`."""
    n, _, error = request.decode().partition(":")
    for i in range(int(n)):
        yield str(i).encode()
    if error:
        raise RAISES[error]()


def register(server: grpc.Server) -> Sequence[str]:
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "Echo": grpc.unary_unary_rpc_method_handler(_echo),
        "Sleep": grpc.unary_unary_rpc_method_handler(_sleep),
        "Raise": grpc.unary_unary_rpc_method_handler(_raise),
        "Count": grpc.unary_stream_rpc_method_handler(_count),
    }),))
    return [SERVICE]


def call(channel: grpc.Channel, method: str, payload: bytes, **kwargs) -> bytes:
    return channel.unary_unary(f"/{SERVICE}/{method}")(payload, **kwargs)


def stream(channel: grpc.Channel, method: str, payload: bytes, **kwargs):
    return channel.unary_stream(f"/{SERVICE}/{method}")(payload, **kwargs)


if __name__ == "__main__":
    # A probe server process for the SIGTERM test: the full `serve` path, on the inference settings.
    from fastserve.runtime.server import serve

    serve("inference", register)
