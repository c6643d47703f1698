"""`FastServeClient`: one object for the four services, each on its own port of one host."""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property

import grpc

from fastserve.client.calls import Caller, RetryPolicy
from fastserve.client.channels import health_status, make_channel
from fastserve.client.inference import InferenceClient
from fastserve.client.optimization import OptimizationClient
from fastserve.client.preprocessing import PreprocessingClient
from fastserve.client.registry import RegistryClient
from fastserve.client.settings import DEFAULT_MAX_MESSAGE_MB, DEFAULT_PORTS, SERVICES, ClientSettings
from fastserve.client.training import TrainingClient


class FastServeClient:
    """Clients of every service (`.preprocessing`, `.training`, `.optimization`, `.inference`).

    `host` and the default ports reach a local stack; `ports` overrides some, and `hosts` the host of
    some (services on hosts of their own, e.g. containers). `token` is sent as
    `authorization: Bearer <token>`; `tls_ca` (a PEM file of trusted roots, e.g. the server's own
    self-signed certificate) turns TLS on, with `client_cert`/`client_key` for mutual TLS. `timeout`
    replaces every call's default deadline except job watches, which run as long as the job does.
    Channels open on first use; `close()` (or `with`) closes them."""

    def __init__(self, host: str = "127.0.0.1", *, ports: Mapping[str, int] | None = None,
                 hosts: Mapping[str, str] | None = None, token: str = "",
                 tls_ca: str = "", client_cert: str = "", client_key: str = "", timeout: float | None = None,
                 retry: RetryPolicy | None = None, max_message_mb: int = DEFAULT_MAX_MESSAGE_MB) -> None:
        hosts, ports = hosts or {}, ports or {}
        self.targets = {s: f"{hosts.get(s) or host}:{ports.get(s, DEFAULT_PORTS[s])}" for s in SERVICES}
        self._channel_settings = dict(token=token, tls_ca=tls_ca, client_cert=client_cert, client_key=client_key,
                                      max_message_mb=max_message_mb)
        self._caller = Caller(retry or RetryPolicy(), timeout)
        self._channels: dict[str, grpc.Channel] = {}

    @classmethod
    def from_settings(cls, settings: ClientSettings, host: str | None = None, **kwargs) -> FastServeClient:
        """A client of the stack `settings` describe (its host, ports, token and TLS certificate)."""
        values = dict(ports=settings.ports, token=settings.token, tls_ca=settings.tls_ca,
                      max_message_mb=settings.max_message_mb)
        return cls(settings.host if host is None else host, **{**values, **kwargs})

    @classmethod
    def from_env(cls, host: str | None = None, **kwargs) -> FastServeClient:
        """A client of the stack the `FASTSERVE_*` variables describe (see `ClientSettings.from_env`)."""
        return cls.from_settings(ClientSettings.from_env(), host, **kwargs)

    def channel(self, service: str) -> grpc.Channel:
        if service not in self._channels:
            retry = self._caller.retry
            # Reconnect at the pace of the retries, not gRPC's default (up to two minutes apart), so that
            # a retried call finds a server that has come back.
            options = [("grpc.initial_reconnect_backoff_ms", int(retry.initial_backoff * 1000) or 1),
                       ("grpc.max_reconnect_backoff_ms", int(retry.max_backoff * 1000) or 1)]
            self._channels[service] = make_channel(self.targets[service], options=options, **self._channel_settings)
        return self._channels[service]

    @cached_property
    def preprocessing(self) -> PreprocessingClient:
        return PreprocessingClient(self.channel("preprocessing"), self._caller)

    @cached_property
    def training(self) -> TrainingClient:
        return TrainingClient(self.channel("training"), self._caller)

    @cached_property
    def optimization(self) -> OptimizationClient:
        return OptimizationClient(self.channel("optimization"), self._caller)

    @cached_property
    def inference(self) -> InferenceClient:
        return InferenceClient(self.channel("inference"), self._caller)

    @cached_property
    def registry(self) -> RegistryClient:
        """The artifact registry, served by the inference service."""
        return RegistryClient(self.channel("inference"), self._caller)

    def health(self, service: str, timeout: float = 2.0) -> str:
        """The service's standard health status: `SERVING`, `NOT_SERVING`, ... or `UNREACHABLE`."""
        return health_status(self.channel(service), "", timeout)

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()

    def __enter__(self) -> FastServeClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
