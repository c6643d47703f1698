"""Server interceptors shared by every service: metrics, bearer-token auth and error mapping.

Python's sync gRPC server has no "around call" hook, so each interceptor rebuilds the method handler
with its behaviour wrapped; `_rewrap` does that once for the four call shapes.
"""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from fastserve.common.v1 import errors_pb2
from fastserve.runtime import errors, logs
from fastserve.runtime.metrics import RPC_CALLS, RPC_ERRORS, RPC_IN_FLIGHT, RPC_LATENCY
from fastserve.runtime.validation import check_request

log = logging.getLogger(__name__)

Behaviour = Callable[[Any, grpc.ServicerContext], Any]

STATUS_OF_REASON: dict[str, grpc.StatusCode] = {
    "INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT,
    "NOT_FOUND": grpc.StatusCode.NOT_FOUND,
    "ALREADY_EXISTS": grpc.StatusCode.ALREADY_EXISTS,
    "FAILED_PRECONDITION": grpc.StatusCode.FAILED_PRECONDITION,
    "RESOURCE_EXHAUSTED": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "UNAVAILABLE": grpc.StatusCode.UNAVAILABLE,
    "DEADLINE_EXCEEDED": grpc.StatusCode.DEADLINE_EXCEEDED,
    "CANCELLED": grpc.StatusCode.CANCELLED,
    "UNAUTHENTICATED": grpc.StatusCode.UNAUTHENTICATED,
    "INTERNAL": grpc.StatusCode.INTERNAL,
}

HEALTH_PREFIX = "/grpc.health.v1.Health/"


class _Interceptor(grpc.ServerInterceptor):
    """Wraps the behaviour of every handler; subclasses implement `around_unary` and `around_stream`."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        return _rewrap(handler, lambda b: self.around_unary(method, b, handler_call_details),
                       lambda b: self.around_stream(method, b, handler_call_details))

    def around_unary(self, method: str, behaviour: Behaviour, details) -> Behaviour:
        raise NotImplementedError

    def around_stream(self, method: str, behaviour: Behaviour, details) -> Behaviour:
        raise NotImplementedError


def _rewrap(handler: grpc.RpcMethodHandler, wrap_unary_reply, wrap_stream_reply,
            request_deserializer: Callable[[bytes], Any] | None = None) -> grpc.RpcMethodHandler:
    if handler.unary_unary:
        factory, behaviour = grpc.unary_unary_rpc_method_handler, wrap_unary_reply(handler.unary_unary)
    elif handler.stream_unary:
        factory, behaviour = grpc.stream_unary_rpc_method_handler, wrap_unary_reply(handler.stream_unary)
    elif handler.unary_stream:
        factory, behaviour = grpc.unary_stream_rpc_method_handler, wrap_stream_reply(handler.unary_stream)
    else:
        factory, behaviour = grpc.stream_stream_rpc_method_handler, wrap_stream_reply(handler.stream_stream)
    return factory(behaviour, request_deserializer=request_deserializer or handler.request_deserializer,
                   response_serializer=handler.response_serializer)


def _split(method: str) -> str:
    return method.rsplit("/", 1)[-1]


class MetricsInterceptor(_Interceptor):
    """Outermost: counts every call, its latency and the calls in flight, whatever stops it."""

    def __init__(self, service: str) -> None:
        self.service = service

    def _finish(self, method: str, context: grpc.ServicerContext, start: float, failed: bool) -> None:
        code = context.code() or (grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK)
        name = code.name
        RPC_CALLS.labels(self.service, method, name).inc()
        if code is not grpc.StatusCode.OK:
            RPC_ERRORS.labels(self.service, method, name).inc()
        RPC_LATENCY.labels(self.service, method).observe(time.perf_counter() - start)
        RPC_IN_FLIGHT.labels(self.service, method).dec()

    def around_unary(self, method, behaviour, details):
        name = _split(method)

        def run(request, context):
            RPC_IN_FLIGHT.labels(self.service, name).inc()
            start, failed = time.perf_counter(), True
            try:
                reply = behaviour(request, context)
                failed = False
                return reply
            finally:
                self._finish(name, context, start, failed)
        return run

    def around_stream(self, method, behaviour, details):
        name = _split(method)

        def run(request, context):
            RPC_IN_FLIGHT.labels(self.service, name).inc()
            start, failed = time.perf_counter(), True
            try:
                yield from behaviour(request, context)
                failed = False
            finally:
                self._finish(name, context, start, failed)
        return run


class AuthInterceptor(_Interceptor):
    """Checks `authorization: Bearer <token>` on every call except health checks (probes send none)."""

    def __init__(self, token: str) -> None:
        self.expected = f"Bearer {token}".encode()

    def _allowed(self, method: str, details) -> bool:
        if method.startswith(HEALTH_PREFIX):
            return True
        sent = dict(details.invocation_metadata or ()).get("authorization", "")
        return hmac.compare_digest(sent.encode(), self.expected)

    @staticmethod
    def _deny(context: grpc.ServicerContext) -> None:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

    def around_unary(self, method, behaviour, details):
        if self._allowed(method, details):
            return behaviour
        return lambda request, context: self._deny(context)

    def around_stream(self, method, behaviour, details):
        if self._allowed(method, details):
            return behaviour

        def deny(request, context) -> Iterator[Any]:
            self._deny(context)
            yield from ()
        return deny


class ErrorInterceptor(_Interceptor):
    """Maps domain exceptions to status codes with details; anything else to INTERNAL with a request id.

    The request id is taken from the caller's `x-request-id` metadata or made here; it tags every log
    line of the call and comes back in the `x-request-id` trailing metadata and in `ErrorDetail`.

    It is also where every request is checked before a servicer sees it: one that does not parse, and one
    that breaks `fastserve.runtime.validation`, is INVALID_ARGUMENT; with client streaming, each message
    as it arrives.
    """

    def __init__(self, service: str, home: str = "") -> None:
        self.service = service
        self.home = home

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        check = _CheckedStream if handler.stream_unary or handler.stream_stream else _checked
        return _rewrap(handler,
                       lambda b: self.around_unary(method, _checking(b, check), handler_call_details),
                       lambda b: self.around_stream(method, _checking(b, check), handler_call_details),
                       request_deserializer=_tolerant(handler.request_deserializer))

    def _start(self, context: grpc.ServicerContext) -> tuple[str, Any]:
        rid = dict(context.invocation_metadata() or ()).get("x-request-id") or uuid.uuid4().hex[:16]
        token = logs.request_id.set(rid)
        context.set_trailing_metadata((("x-request-id", rid),))
        return rid, token

    def around_unary(self, method, behaviour, details):
        def run(request, context):
            rid, token = self._start(context)
            try:
                return behaviour(request, context)
            except Exception as exc:  # noqa: BLE001 - the one place every error is mapped
                self._abort(exc, method, rid, context)
            finally:
                logs.request_id.reset(token)
        return run

    def around_stream(self, method, behaviour, details):
        def run(request, context):
            rid, token = self._start(context)
            try:
                yield from behaviour(request, context)
            except Exception as exc:  # noqa: BLE001
                self._abort(exc, method, rid, context)
            finally:
                logs.request_id.reset(token)
        return run

    def _abort(self, exc: Exception, method: str, rid: str, context: grpc.ServicerContext) -> None:
        if context.code() not in (None, grpc.StatusCode.OK):
            raise exc  # the handler already aborted with its own status
        if isinstance(exc, errors.FastServeError):
            reason, message = exc.reason, errors.without_paths(exc.message, self.home)
            log.info("%s -> %s: %s", method, reason, exc.message)
        else:
            reason, message = "INTERNAL", f"internal error (request id {rid})"
            log.error("%s failed with an unexpected error (request id %s)", method, rid, exc_info=exc)
        status = rpc_status.to_status(self.status(exc, reason, message, rid))
        # abort_with_status replaces the trailing metadata: keep the request id in it.
        context.abort_with_status(_Status(status.code, status.details,
                                          (*status.trailing_metadata, ("x-request-id", rid))))

    def status(self, exc: Exception, reason: str, message: str, rid: str) -> status_pb2.Status:
        code = STATUS_OF_REASON[reason]
        detail = errors_pb2.ErrorDetail(
            reason=errors_pb2.ErrorReason.Value(f"ERROR_REASON_{reason}"), request_id=rid, service=self.service)
        details = [_pack(detail)]
        if isinstance(exc, errors.FastServeError) and exc.violations:
            details.insert(0, _pack(error_details_pb2.BadRequest(field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=errors.without_paths(v.description, self.home))
                for v in exc.violations])))
        return status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=details)


@dataclass(frozen=True)
class _Undecodable:
    """What the deserializer hands on for bytes that are not a request: gRPC would answer INTERNAL
    ("Exception deserializing request!") before any interceptor ran, so the refusal waits for the behaviour."""

    message_name: str
    problem: str


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    message_class = getattr(deserializer, "__self__", None)
    message_name = getattr(getattr(message_class, "DESCRIPTOR", None), "full_name", "message")

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as exc:
            # upb says "Error parsing message with type 'X': String field had bad UTF-8": keep the cause.
            return _Undecodable(message_name, str(exc).rpartition(": ")[2] or "it does not parse")
    return deserialize


def _checked(request: Any) -> Any:
    if isinstance(request, _Undecodable):
        raise errors.InvalidArgument(f"the request is not a valid {request.message_name}: {request.problem}")
    if isinstance(request, Message):
        check_request(request)
    return request


class _CheckedStream:
    """A client stream whose every message is checked as it is read. A bad one raises InvalidArgument
    from `next` and the stream goes on after it (a generator could not), so a servicer that reports
    errors in its stream can, through `each_message`; a plain `for` loop ends the call with the error."""

    def __init__(self, requests: Iterator[Any]) -> None:
        self.requests = iter(requests)

    def __iter__(self) -> _CheckedStream:
        return self

    def __next__(self) -> Any:
        return _checked(next(self.requests))


def each_message(requests: Iterator[Any]) -> Iterator[tuple[Any, errors.FastServeError | None]]:
    """`(request, None)` for each good message of a client stream and `(None, error)` for each refused
    one, for a servicer that answers a bad message in its stream and reads on."""
    requests = iter(requests)
    while True:
        try:
            yield next(requests), None
        except StopIteration:
            return
        except errors.FastServeError as exc:
            yield None, exc


def _checking(behaviour: Behaviour, check: Callable[[Any], Any]) -> Behaviour:
    return lambda request, context: behaviour(check(request), context)


@dataclass(frozen=True)
class _Status(grpc.Status):
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple


def _pack(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def build_interceptors(service: str, auth_token: str, home: str = "") -> list[grpc.ServerInterceptor]:
    """The chain every server gets, outermost first; `home` (FASTSERVE_HOME) is never shown to clients."""
    chain: list[grpc.ServerInterceptor] = [MetricsInterceptor(service)]
    if auth_token:
        chain.append(AuthInterceptor(auth_token))
    chain.append(ErrorInterceptor(service, home))
    return chain
