"""The stack's commands, added to the client package's `fastserve` command through the `fastserve.cli`
entry point (pyproject.toml): up, down, status, logs, config, demo. They run this machine's processes, so
they read the stack's whole configuration, not only the client's settings."""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from fastserve.cli.common import LocalError, command, print_json, state
from fastserve.runtime.config import SERVICES, Config, describe
from fastserve.runtime.errors import FastServeError
from fastserve.stack.demo import run_demo
from fastserve.stack.processes import HTTP_SERVICES, Stack


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


# `fastserve status` exit codes besides 0 (all serve); the Makefile's status target accepts NOT_RUNNING.
NOT_RUNNING, IN_PART = 3, 4


def _path_hint() -> str:
    """Where the `fastserve` command is, when this shell would not find it (`make up` runs it from the
    virtualenv, which the user's shell may not have activated)."""
    if shutil.which("fastserve"):
        return ""
    bin_dir = Path(sys.executable).parent
    shown = os.path.relpath(bin_dir) if bin_dir.is_relative_to(Path.cwd()) else str(bin_dir)
    return f"\nThe `fastserve` command is {shown}/fastserve; `source {shown}/activate` puts it on PATH."


def register(app: typer.Typer) -> None:
    """Add the stack's commands to `app`."""
    @_command(app, "up", help="Start the local stack in the background and wait until it serves.")
    def up(ctx: typer.Context,
           timeout: Annotated[float, typer.Option(help="Seconds to wait for every health check.")] = 120.0) -> int:
        config = Config.from_env()
        stack = Stack(config)
        components = stack.up(timeout=timeout)
        if state(ctx).json:
            print_json([{"name": c.name, "pid": c.pid, "port": c.port, "log": c.log,
                         **({"url": stack.url(c)} if c.name in HTTP_SERVICES else {})} for c in components])
            return 0
        for c in components:
            url = f" {stack.url(c)}" if c.name in HTTP_SERVICES else ""
            print(f"{c.name:<14} pid {c.pid:<8} {'port ' + str(c.port) if c.port else ''}{url}")
        print(f"FastServe is up (state and logs under {config.home}); stop it with `make down`.{_path_hint()}")
        return 0

    @_command(app, "down", help="Stop exactly what `up` started.")
    def down(ctx: typer.Context) -> int:
        stopped = Stack(Config.from_env()).down()
        if state(ctx).json:
            print_json({"stopped": stopped})
        else:
            print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
        return 0

    @_command(app, "status", help="Show the stack's processes and health. Exit 0 when every process serves, "
                                   f"{NOT_RUNNING} when the stack is not running, {IN_PART} when it runs in part (a "
                                   "process ended, or a service does not serve); `make status` fails only for "
                                   f"{IN_PART} (or a status that could not be read).")
    def status(ctx: typer.Context) -> int:
        config = Config.from_env()
        rows = Stack(config).status()
        serving = [r["name"] for r in rows if r["state"] in ("SERVING", "RUNNING")]
        ended = [r["name"] for r in rows if r["state"] == "STOPPED"]
        code = NOT_RUNNING if len(ended) == len(rows) else 0 if len(serving) == len(rows) else IN_PART
        if state(ctx).json:
            print_json(rows)
            return code
        for row in rows:
            port = f"port {row['port']}" if row["port"] else ""
            url = f" {row['url']}" if "url" in row else ""
            print(f"{row['name']:<14} {row['state']:<12} pid {row['pid']:<8} {port}{url}")
        if code == NOT_RUNNING:
            print("the stack is not running: start it with `make up` (or `fastserve up`)")
        elif code == IN_PART:
            troubled = [r["name"] for r in rows if r["name"] not in serving]
            print(f"the stack runs in part: {', '.join(troubled)} not serving; see `fastserve logs {troubled[0]}`, "
                  "and restart it with `make down && make up`")
        print(f"namespace {config.namespace} (Redis keys under {config.redis_prefix})")
        return code

    @_command(app, "logs", help="Print the end of a stack process's log (FASTSERVE_HOME/logs/<process>.log); "
                                 "with --follow, then what the process goes on writing, until Ctrl-C.")
    def logs(ctx: typer.Context,
             service: Annotated[str, typer.Argument(help=f"{', '.join(PROCESSES)} (or redis, when the stack "
                                                         "started its own).")],
             lines: Annotated[int, typer.Option("-n", "--lines", min=0, help="How many of the last lines.")] = 20,
             follow: Annotated[bool, typer.Option("--follow", "-f", help="Go on printing new lines.")] = False
             ) -> int:
        path = log_path(Stack(Config.from_env()), service)
        if state(ctx).json:
            def emit(line: str) -> None:
                print(json.dumps({"process": service, "line": line}), flush=True)
        else:
            def emit(line: str) -> None:
                print(line, flush=True)
        last, end = tail(path, lines)
        for line in last:
            emit(line)
        if follow:
            try:
                follow_file(path, end, emit)
            except KeyboardInterrupt:
                pass  # how a follow ends
        return 0

    @_command(app, "config", help="List every FASTSERVE_* setting with its default.")
    def config(ctx: typer.Context) -> int:
        # The namespace's default is derived from the home, so the value in effect is shown beside it.
        effective = {"FASTSERVE_NAMESPACE": Config.from_env().namespace}
        if state(ctx).json:
            print_json([{"variable": env, "default": default, "doc": doc,
                         **({"value": effective[env]} if env in effective else {})}
                        for env, default, doc in describe()])
            return 0
        for env, default, doc in describe():
            now = f", in effect {effective[env]!r}" if env in effective else ""
            print(f"{env}  (default {default!r}{now})\n    {doc}")
        return 0

    @_command(app, "demo", help="Run the demo against a fresh local stack.")
    def demo(ctx: typer.Context) -> int:
        run_demo(Config.from_env())  # a failed stage raises, and is reported as every error is
        return 0


PROCESSES = (*SERVICES, *HTTP_SERVICES, "worker")
"""The processes whose logs are always FASTSERVE_HOME/logs/<process>.log."""


def log_path(stack: Stack, name: str) -> Path:
    """The log of process `name`: the one the stack recorded, else where `up` writes it."""
    recorded = {c.name: Path(c.log) for c in stack.components()}
    if name not in recorded and name not in PROCESSES:
        raise LocalError(f"no stack process {name!r}; one of {', '.join(dict.fromkeys([*PROCESSES, *recorded]))}")
    path = recorded.get(name, stack.log_dir / f"{name}.log")
    if not path.is_file():
        raise LocalError(f"no log at {path}: the stack has not run with FASTSERVE_HOME={stack.config.home}")
    return path


_BLOCK = 64 * 1024


def tail(path: Path, count: int) -> tuple[list[str], int]:
    """The last `count` lines of `path`, read from its end (a log can be large), and the offset of its end."""
    with open(path, "rb") as f:
        end = start = f.seek(0, os.SEEK_END)
        data = b""
        # One newline more than lines wanted: the first line taken is then whole.
        while start > 0 and data.count(b"\n") <= count:
            step = min(_BLOCK, start)
            start -= step
            f.seek(start)
            data = f.read(step) + data
    return (data.decode(errors="replace").splitlines()[-count:] if count else []), end


def follow_file(path: Path, offset: int, emit: Callable[[str], None], poll: float = 0.2) -> None:
    """Emit each line appended to `path` after `offset`, as it is completed, until interrupted; a log
    that shrank (truncated, or a new stack's) is read again from its start."""
    while True:
        size = path.stat().st_size if path.exists() else 0
        if size < offset:
            offset = 0
        if size > offset:
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read(size - offset)
            whole = chunk.rfind(b"\n") + 1  # a line still being written waits for its end
            for line in chunk[:whole].decode(errors="replace").splitlines():
                emit(line)
            offset += whole
        time.sleep(poll)
