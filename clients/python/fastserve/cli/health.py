"""`fastserve health`: ask one server's standard health service."""

from __future__ import annotations

from typing import Annotated

import typer

from fastserve.cli.common import command, print_json, state
from fastserve.client.channels import health_status, make_channel


def register(app: typer.Typer) -> None:
    @command(app, "health", help="Ask one server's standard health service (exit 0 when SERVING).")
    def health(ctx: typer.Context,
               port: Annotated[int, typer.Option(help="The server's gRPC port.")],
               host: Annotated[str, typer.Option(help="The server's address.")] = "127.0.0.1",
               service: Annotated[str, typer.Option(help="A full service name; empty for the whole server.")] = ""
               ) -> int:
        # The stack's own token and TLS settings, so that a container's health check works under TLS.
        s = state(ctx)
        token, tls_ca = s.overrides.get("token", s.settings.token), s.overrides.get("tls_ca", s.settings.tls_ca)
        with make_channel(f"{host}:{port}", token=token, tls_ca=tls_ca,
                          max_message_mb=s.settings.max_message_mb) as channel:
            result = health_status(channel, service)
        print_json({"status": result}) if s.json else print(result)
        return 0 if result == "SERVING" else 1
