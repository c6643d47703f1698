"""Commands of the local stack and settings: up, down, status, health, config, demo."""

from __future__ import annotations

from typing import Annotated

import typer

from shared.channels import health_status, open_channel
from shared.cli.common import command, print_json, state
from shared.config import describe
from shared.demo import run_demo
from shared.stack import Stack


def register(app: typer.Typer) -> None:
    @command(app, "up", help="Start the local stack in the background and wait until it serves.")
    def up(ctx: typer.Context,
           timeout: Annotated[float, typer.Option(help="Seconds to wait for every health check.")] = 120.0) -> int:
        config = state(ctx).config
        components = Stack(config).up(timeout=timeout)
        if state(ctx).json:
            print_json([{"name": c.name, "pid": c.pid, "port": c.port, "log": c.log} for c in components])
            return 0
        for c in components:
            print(f"{c.name:<14} pid {c.pid:<8} {'port ' + str(c.port) if c.port else ''}")
        print(f"FastServe is up (state and logs under {config.home}); stop it with `make down`.")
        return 0

    @command(app, "down", help="Stop exactly what `up` started.")
    def down(ctx: typer.Context) -> int:
        stopped = Stack(state(ctx).config).down()
        if state(ctx).json:
            print_json({"stopped": stopped})
        else:
            print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
        return 0

    @command(app, "status", help="Show the stack's processes and health (exit 3 unless all serve).")
    def status(ctx: typer.Context) -> int:
        rows = Stack(state(ctx).config).status()
        code = 0 if rows and all(r["state"] in ("SERVING", "RUNNING") for r in rows) else 3
        if state(ctx).json:
            print_json(rows)
            return code
        if not rows:
            print("the stack is not running (start it with `make up`)")
        for row in rows:
            port = f"port {row['port']}" if row["port"] else ""
            print(f"{row['name']:<14} {row['state']:<12} pid {row['pid']:<8} {port}")
        return code

    @command(app, "health", help="Ask one server's standard health service (exit 0 when SERVING).")
    def health(ctx: typer.Context,
               port: Annotated[int, typer.Option(help="The server's gRPC port.")],
               host: Annotated[str, typer.Option(help="The server's address.")] = "127.0.0.1",
               service: Annotated[str, typer.Option(help="A full service name; empty for the whole server.")] = ""
               ) -> int:
        # The stack's own settings (TLS, token), so that the container's health check works under TLS.
        with open_channel(f"{host}:{port}", state(ctx).config) as channel:
            result = health_status(channel, service)
        print_json({"status": result}) if state(ctx).json else print(result)
        return 0 if result == "SERVING" else 1

    @command(app, "config", help="List every FASTSERVE_* setting with its default.")
    def config(ctx: typer.Context) -> int:
        if state(ctx).json:
            print_json([{"variable": env, "default": default, "doc": doc} for env, default, doc in describe()])
            return 0
        for env, default, doc in describe():
            print(f"{env}  (default {default!r})\n    {doc}")
        return 0

    @command(app, "demo", help="Run the demo against a fresh local stack.")
    def demo(ctx: typer.Context) -> int:
        run_demo(state(ctx).config)  # a failed stage raises, and is reported as every error is
        return 0
