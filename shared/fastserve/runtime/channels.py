"""Channels from one process of the stack to another, with the stack's own TLS and token settings."""

from __future__ import annotations

import grpc

from fastserve.client.channels import make_channel
from fastserve.runtime.config import Config


def open_channel(target: str, config: Config, client_cert: str = "", client_key: str = "") -> grpc.Channel:
    """A channel to `target`: TLS when the stack uses it (its certificate as the trusted root, so a
    self-signed one works), the bearer token on every call when one is configured."""
    return make_channel(target, token=config.auth_token, tls_ca=config.tls_cert, client_cert=client_cert,
                        client_key=client_key, max_message_mb=config.max_message_mb)
