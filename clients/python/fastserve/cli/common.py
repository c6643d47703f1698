"""What every command shares: the invocation's state (settings, `--json`, the client), the `--json`
flag on every command, and output helpers (JSON to stdout, one red line for errors)."""

from __future__ import annotations

import functools
import inspect
import json
import sys
from dataclasses import dataclass, field
from typing import Annotated, Any

import typer
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console
from rich.text import Text

from fastserve.client import FastServeClient
from fastserve.client.settings import ClientSettings

# soft_wrap: a line stays one line however narrow the terminal (or 80 columns when not a terminal), so
# that an error, a URI or a status line can be copied or grepped whole.
console = Console(highlight=False, soft_wrap=True)
errors = Console(stderr=True, soft_wrap=True, highlight=False)


class LocalError(Exception):
    """A problem on this side of the call (a bad setting, a missing file): `fastserve: <message>`, exit 2."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass
class State:
    """One invocation: the settings, global options, and a client made on first use."""

    settings: ClientSettings
    json: bool = False
    host: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    _client: FastServeClient | None = None

    def client(self) -> FastServeClient:
        if self._client is None:
            self._client = FastServeClient.from_settings(self.settings, host=self.host, **self.overrides)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def state(ctx: typer.Context) -> State:
    return ctx.find_root().obj


def _use_json(ctx: typer.Context, value: bool) -> None:
    root = ctx.find_root().obj
    if value and isinstance(root, State):
        root.json = True


_JSON_FLAG = Annotated[bool, typer.Option("--json", callback=_use_json, help="Machine-readable output (JSON).")]


def command(app: typer.Typer, name: str | None = None, **kwargs):
    """`app.command`, with `--json` after the command's name too (`fastserve models list --json`): the
    flag's callback sets the invocation's state, and the command never sees it."""
    def decorate(fn):
        @functools.wraps(fn)
        def run(*args, json_output: bool = False, **kw):
            return fn(*args, **kw)

        signature = inspect.signature(fn, eval_str=True)
        flag = inspect.Parameter("json_output", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=_JSON_FLAG)
        run.__signature__ = signature.replace(parameters=[*signature.parameters.values(), flag])
        run.__annotations__ = {**fn.__annotations__, "json_output": _JSON_FLAG}
        return app.command(name, **kwargs)(run)
    return decorate


def group(help: str) -> typer.Typer:
    return typer.Typer(help=help, no_args_is_help=True, add_completion=False)


def to_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True, unquote_int64_if_possible=True)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
    sys.stdout.flush()


def error_line(text: str) -> None:
    errors.print(Text(text, style="bold red"))
