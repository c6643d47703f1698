"""The stack's commands, added to the client package's `fastserve` command through the `fastserve.cli`
entry point (pyproject.toml): up, down, status, config, demo. They run this machine's processes, so
they read the stack's whole configuration, not only the client's settings."""

from __future__ import annotations

import functools
from typing import Annotated

import typer

from fastserve.cli.common import LocalError, command, print_json, state
from fastserve.runtime.config import Config, describe
from fastserve.runtime.errors import FastServeError
from fastserve.stack.demo import run_demo
from fastserve.stack.processes import Stack


def _command(app: typer.Typer, name: str, **kwargs):
    """`command`, with the server's domain errors shown as the CLI's one-line local errors (exit 2)."""
    def decorate(fn):
        @functools.wraps(fn)
        def run(*args, **kw):
            try:
                return fn(*args, **kw)
            except FastServeError as exc:
                raise LocalError(exc.message) from exc
        return command(app, name, **kwargs)(run)
    return decorate


def register(app: typer.Typer) -> None:
    """Add the stack's commands to `app`."""
    @_command(app, "up", help="Start the local stack in the background and wait until it serves.")
    def up(ctx: typer.Context,
           timeout: Annotated[float, typer.Option(help="Seconds to wait for every health check.")] = 120.0) -> int:
        config = Config.from_env()
        components = Stack(config).up(timeout=timeout)
        if state(ctx).json:
            print_json([{"name": c.name, "pid": c.pid, "port": c.port, "log": c.log} for c in components])
            return 0
        for c in components:
            print(f"{c.name:<14} pid {c.pid:<8} {'port ' + str(c.port) if c.port else ''}")
        print(f"FastServe is up (state and logs under {config.home}); stop it with `make down`.")
        return 0

    @_command(app, "down", help="Stop exactly what `up` started.")
    def down(ctx: typer.Context) -> int:
        stopped = Stack(Config.from_env()).down()
        if state(ctx).json:
            print_json({"stopped": stopped})
        else:
            print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
        return 0

    @_command(app, "status", help="Show the stack's processes and health (exit 3 unless all serve).")
    def status(ctx: typer.Context) -> int:
        rows = Stack(Config.from_env()).status()
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

    @_command(app, "config", help="List every FASTSERVE_* setting with its default.")
    def config(ctx: typer.Context) -> int:
        if state(ctx).json:
            print_json([{"variable": env, "default": default, "doc": doc} for env, default, doc in describe()])
            return 0
        for env, default, doc in describe():
            print(f"{env}  (default {default!r})\n    {doc}")
        return 0

    @_command(app, "demo", help="Run the demo against a fresh local stack.")
    def demo(ctx: typer.Context) -> int:
        run_demo(Config.from_env())  # a failed stage raises, and is reported as every error is
        return 0
