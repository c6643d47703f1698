"""The server factory every service uses.

`create_server` builds and starts a gRPC server with the standard health service (overall and per
service), reflection, the shared interceptors, message-size limits, loopback binding by default and
optional TLS/mTLS; `serve` adds the process concerns: logging, metrics, and graceful shutdown on
SIGTERM/SIGINT. Tests call `create_server` with port 0.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fastserve.runtime.config import Config
from fastserve.runtime.interceptors import build_interceptors
from fastserve.runtime.logs import setup_logging
from fastserve.runtime.metrics import serve_metrics
from fastserve.runtime.stores import Stores

log = logging.getLogger(__name__)

Register = Callable[[grpc.Server], Sequence[str]]
"""Adds a service's servicers to the server and returns their full names (`fastserve.x.v1.XService`)."""


@dataclass
class RunningServer:
    """A started server: its port, and the health servicer that tells clients whether it serves."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    service_names: Sequence[str]

    def stop(self, grace: float) -> None:
        """Report NOT_SERVING, refuse new calls, let in-flight calls finish for up to `grace` seconds."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()


def create_server(service: str, register: Register, config: Config, port: int | None = None) -> RunningServer:
    """Build, bind and start the server of `service`; `port` overrides the configured one (0: any free)."""
    limit = config.max_message_mb * 1024 * 1024
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.grpc_threads, thread_name_prefix=service),
        interceptors=build_interceptors(service, config.auth_token),
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
    bound = server.add_secure_port(address, _credentials(config)) if config.tls_cert else \
        server.add_insecure_port(address)
    server.start()
    for name in ["", *names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("%s serving %s on %s:%d (tls=%s, auth=%s)", service, ", ".join(names), config.host, bound,
             bool(config.tls_cert), bool(config.auth_token))
    return RunningServer(server, bound, health_servicer, names)


def _credentials(config: Config) -> grpc.ServerCredentials:
    key, cert = Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes()
    client_ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def serve(service: str, register: Register, config: Config | None = None) -> None:
    """Run `service` until SIGTERM or SIGINT, then shut down gracefully. The entry point of a service."""
    config = config or Config.from_env()
    setup_logging(service, config.log_format, config.log_level)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    running = create_server(service, register, config)
    serve_metrics(config.host, config.metrics_port(service))
    stop.wait()
    log.info("%s shutting down, letting in-flight calls finish (grace %.1fs)", service, config.grace_seconds)
    running.stop(config.grace_seconds)
    log.info("%s stopped", service)


def run_service(service: str, register: Callable[[grpc.Server, Stores], Sequence[str]]) -> None:
    """`python -m services.<name>`: build the stores from the environment and serve until signalled."""
    config = Config.from_env()
    setup_logging(service, config.log_format, config.log_level)
    stores = Stores.from_config(config)
    serve(service, lambda server: register(server, stores), config)
