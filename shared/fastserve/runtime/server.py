"""The server factory every service uses.

`create_server` builds and starts a gRPC server with the standard health service (overall and per
service), reflection, the shared interceptors, message-size limits, loopback binding by default and
optional TLS/mTLS; `serve` adds the process concerns: logging, metrics, and graceful shutdown on
SIGTERM/SIGINT. Tests call `create_server` with port 0.

Shutdown drains: health turns NOT_SERVING at once, the server goes on serving every call, old and
new, for the drain delay (load balancers and health-checking clients move away meanwhile), then it
stops accepting calls, ends its open response streams with UNAVAILABLE "the server is shutting
down" (a client reconnects elsewhere; a job watch resumes after its last event), and lets in-flight
unary calls finish within the grace.
"""

from __future__ import annotations

import contextvars
import logging
import queue
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fastserve.runtime.config import Config
from fastserve.runtime.errors import InvalidArgument
from fastserve.runtime.interceptors import build_interceptors
from fastserve.runtime.logs import setup_logging
from fastserve.runtime.metrics import serve_metrics
from fastserve.runtime.stores import Stores

log = logging.getLogger(__name__)

T = TypeVar("T")


Register = Callable[[grpc.Server], Sequence[str]]
"""Adds a service's servicers to the server and returns their full names (`fastserve.x.v1.XService`)."""


@dataclass
class RunningServer:
    """A started server: its port, and the health servicer that tells clients whether it serves."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    service_names: Sequence[str]

    streams: StreamsEnd

    def stop(self, grace: float, drain: float = 0.0) -> None:
        """Report NOT_SERVING, serve on for `drain` seconds, then refuse new calls, end open streams with
        UNAVAILABLE and let in-flight calls finish for up to `grace` seconds."""
        self.health.enter_graceful_shutdown()
        if drain > 0:
            time.sleep(drain)
        self.streams.closing.set()
        self.server.stop(grace).wait()


SHUTTING_DOWN = "the server is shutting down"
_HEALTH = f"/{health_pb2.DESCRIPTOR.services_by_name['Health'].full_name}/"
_END = object()


class StreamsEnd(grpc.ServerInterceptor):
    """Ends every response stream with UNAVAILABLE once `closing` is set. A stream handler may block
    for long between replies (a watch of an idle job), so it runs on a thread of its own that feeds
    the call's thread, which is then free to end the call; the handler sees the call inactive and
    stops, as when a client leaves."""

    def __init__(self) -> None:
        self.closing = threading.Event()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        # A health watch is how a balancer learns of the shutdown: it goes on, to carry NOT_SERVING.
        if handler is None or not handler.response_streaming or handler_call_details.method.startswith(_HEALTH):
            return handler
        if handler.request_streaming:
            inner, make = handler.stream_stream, grpc.stream_stream_rpc_method_handler
        else:
            inner, make = handler.unary_stream, grpc.unary_stream_rpc_method_handler
        return make(lambda request, context: self._relay(inner, request, context),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)

    def _relay(self, inner, request, context):
        if self.closing.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        replies: queue.Queue = queue.Queue(maxsize=4)
        left = threading.Event()

        def offer(item: tuple) -> bool:
            """Hand `item` over, unless the call's thread has left (then the handler is to stop)."""
            while not left.is_set():
                try:
                    replies.put(item, timeout=0.25)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            replies_of = None
            try:
                replies_of = iter(inner(request, context))
                for reply in replies_of:
                    if not offer((reply, None)):
                        return
                offer((_END, None))
            except BaseException as exc:  # noqa: BLE001 - handed to the call's thread, which raises it
                offer((_END, exc))
            finally:
                close = getattr(replies_of, "close", None)
                if close:
                    close()

        # A copy of the context: the request id the interceptors set stays on the handler's log lines.
        threading.Thread(target=contextvars.copy_context().run, args=(produce,), daemon=True,
                         name="stream-relay").start()
        try:
            while True:
                try:
                    reply, error = replies.get(timeout=0.25)
                except queue.Empty:
                    if self.closing.is_set():
                        context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
                    if not context.is_active():
                        return
                    continue
                if reply is _END:
                    if error is not None:
                        raise error
                    return
                yield reply
                if self.closing.is_set():
                    context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        finally:
            left.set()


def create_server(service: str, register: Register, config: Config, port: int | None = None) -> RunningServer:
    """Build, bind and start the server of `service`; `port` overrides the configured one (0: any free)."""
    limit = config.max_message_mb * 1024 * 1024
    tls = config.server_tls()  # before binding anything: a half-set TLS never serves plaintext
    streams = StreamsEnd()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.grpc_threads, thread_name_prefix=service),
        interceptors=[*build_interceptors(service, config.auth_token, str(config.home)), streams],
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
        ],
    )
    names = list(register(server))
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server)

    address = f"{config.host}:{config.port(service) if port is None else port}"
    bound = server.add_secure_port(address, _credentials(*tls)) if tls else server.add_insecure_port(address)
    server.start()
    for name in ["", *names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("%s serving %s on %s:%d (tls=%s, auth=%s)", service, ", ".join(names), config.host, bound,
             bool(tls), bool(config.auth_token))
    return RunningServer(server, bound, health_servicer, names, streams)


def _credentials(key: bytes, cert: bytes, client_ca: bytes | None) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def serve(service: str, register: Register, config: Config | None = None) -> None:
    """Run `service` until SIGTERM or SIGINT, then shut down gracefully. The entry point of a service."""
    config = config or _or_exit(service, Config.from_env)
    setup_logging(service, config.log_format, config.log_level)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    running = _or_exit(service, lambda: create_server(service, register, config))
    serve_metrics(config.host, config.metrics_port(service))
    stop.wait()
    drain = config.drain_seconds
    log.info("%s shutting down: NOT_SERVING, serving on for %.1fs, then letting in-flight calls finish "
             "(grace %.1fs)", service, drain, config.grace_seconds)
    running.stop(config.grace_seconds, drain)
    log.info("%s stopped", service)


def _or_exit(service: str, start: Callable[[], T]) -> T:
    """`start()`, or exit non-zero saying which setting is wrong: a refused setting is no crash to trace."""
    try:
        return start()
    except InvalidArgument as exc:
        raise SystemExit(f"{service} cannot start: {exc.message}") from None


def run_service(service: str, register: Callable[[grpc.Server, Stores], Sequence[str]]) -> None:
    """`python -m services.<name>`: build the stores from the environment and serve until signalled."""
    config = _or_exit(service, Config.from_env)
    setup_logging(service, config.log_format, config.log_level)
    stores = Stores.from_config(config)
    serve(service, lambda server: register(server, stores), config)
