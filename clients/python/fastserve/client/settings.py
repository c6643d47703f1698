"""The client's own settings: where the services are and how to reach them.

The client reads the same `FASTSERVE_*` variables as the stack it calls (host, ports, token, TLS
certificate), so one environment serves both, but it imports nothing of the server: the defaults
live here, and the server's configuration registry takes its default ports from `DEFAULT_PORTS`.
The default deadline of each kind of call is in `fastserve.client.calls`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

SERVICES: tuple[str, ...] = ("preprocessing", "training", "optimization", "inference")
"""The services of a FastServe stack, in start order."""

DEFAULT_PORTS: Mapping[str, int] = {"preprocessing": 50051, "training": 50052, "optimization": 50053,
                                    "inference": 50054}
"""The gRPC port of each service on one host."""

DEFAULT_MAX_MESSAGE_MB = 64
"""Largest message sent or received, in MiB, as the servers' default."""


def reachable_host(bind: str) -> str:
    """Where a client on the same machine reaches a server bound to `bind`: a wildcard bind on loopback."""
    return "127.0.0.1" if bind in ("0.0.0.0", "", "::") else bind


class SettingError(ValueError):
    """A `FASTSERVE_*` variable the client cannot read; `name` is the variable."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name, self.message = name, message


@dataclass(frozen=True)
class ClientSettings:
    """Host, ports, token and TLS roots of the stack to call."""

    host: str = "127.0.0.1"
    ports: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    token: str = ""
    tls_ca: str = ""
    max_message_mb: int = DEFAULT_MAX_MESSAGE_MB
    log_level: str = "WARNING"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ClientSettings:
        """`FASTSERVE_HOST` (a wildcard bind is reached on loopback), `FASTSERVE_<SERVICE>_PORT`,
        `FASTSERVE_AUTH_TOKEN`, `FASTSERVE_TLS_CERT` (the stack's certificate, trusted as the root),
        `FASTSERVE_MAX_MESSAGE_MB` and `FASTSERVE_LOG_LEVEL`."""
        env = os.environ if env is None else env
        ports = {s: _int(env, f"FASTSERVE_{s.upper()}_PORT", DEFAULT_PORTS[s]) for s in SERVICES}
        level = env.get("FASTSERVE_LOG_LEVEL") or "INFO"
        return cls(host=reachable_host(env.get("FASTSERVE_HOST", "")), ports=ports,
                   token=env.get("FASTSERVE_AUTH_TOKEN", ""), tls_ca=env.get("FASTSERVE_TLS_CERT", ""),
                   max_message_mb=_int(env, "FASTSERVE_MAX_MESSAGE_MB", DEFAULT_MAX_MESSAGE_MB),
                   # A command line stays quiet at the stack's default level.
                   log_level="WARNING" if level.upper() == "INFO" else level.upper())


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise SettingError(name, f"{name}={raw!r} is not a valid int") from None
