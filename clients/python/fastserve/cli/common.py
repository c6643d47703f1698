"""What every command shares: the invocation's state (settings, `--json`, `--wide`, the client), the
`--json` and `--wide` flags on every command, the map from request fields to each command's flags, and
output helpers (JSON to stdout, tables, one red line for errors)."""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

import typer
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message
from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from fastserve.client.client import FastServeClient
from fastserve.client.errors import ClientError
from fastserve.client.settings import ClientSettings

# soft_wrap: a line stays one line however narrow the terminal, so that an error, a URI or a status
# line can be copied or grepped whole (tables choose their own width: `print_table`).
console = Console(highlight=False, soft_wrap=True)
errors = Console(stderr=True, soft_wrap=True, highlight=False)


class LocalError(Exception):
    """A problem on this side of the call (a bad setting, a missing file, no server at the address):
    `fastserve: <message>`, exit 2."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


Flags = Mapping[str, str]
"""A command's map from request field paths to what the user typed: `sampling.temperature` ->
`--temperature`. A key names the field and every field under it (`model` covers `model.name` and
`steps` covers `steps[0].method`); a key ending in `.*` covers the fields under it and puts the next
name into the flag's `{}` (`model.architecture.*` -> `--arch {}=`). The longest matching key wins. A
flag that does not start with `-` is an argument (`texts`)."""


class FailedCall(Exception):
    """A `ClientError` raised inside a command, with that command's `Flags`, so that the error line
    names the flags the user typed rather than the request's field paths."""

    def __init__(self, error: ClientError, flags: Flags) -> None:
        super().__init__(error.line())
        self.error, self.flags = error, flags


@dataclass
class State:
    """One invocation: the settings, global options, and a client made on first use."""

    settings: ClientSettings
    json: bool = False
    host: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    wide: bool = False
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


def _setter(name: str):
    def set_flag(ctx: typer.Context, value: bool) -> None:
        root = ctx.find_root().obj
        if value and isinstance(root, State):
            setattr(root, name, True)
    return set_flag


JSON_HELP = "Machine-readable output (JSON)."
WIDE_HELP = "Tables with every column in full, one line a row, however wide the terminal."
_FLAGS = {"json_output": Annotated[bool, typer.Option("--json", callback=_setter("json"), help=JSON_HELP)],
          "wide_output": Annotated[bool, typer.Option("--wide", callback=_setter("wide"), help=WIDE_HELP)]}


def command(app: typer.Typer, name: str | None = None, *, flags: Flags | None = None, **kwargs):
    """`app.command`, with `--json` and `--wide` after the command's name too (`fastserve models list
    --json`): the flags' callbacks set the invocation's state, and the command never sees them. A call
    that reached no server is the local error that says so; any other `ClientError` leaves with the
    command's `flags`, for the error line."""
    def decorate(fn):
        @functools.wraps(fn)
        def run(*args, json_output: bool = False, wide_output: bool = False, **kw):
            try:
                return fn(*args, **kw)
            except ClientError as error:
                if error.unreachable:
                    # Every command takes the context (its first parameter, `ctx`).
                    ctx = kw.get("ctx") or next(a for a in args if isinstance(a, typer.Context))
                    raise nothing_answers(state(ctx), error) from error
                raise FailedCall(error, flags or {}) from error

        signature = inspect.signature(fn, eval_str=True)
        extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=False, annotation=a)
                 for n, a in _FLAGS.items()]
        run.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *extra])
        run.__annotations__ = {**fn.__annotations__, **_FLAGS}
        return app.command(name, **kwargs)(run)
    return decorate


def nothing_answers(s: State, error: ClientError) -> LocalError:
    """`nothing answers at 127.0.0.1:50054 (inference): ...`: which service the address is, from the
    ports this invocation calls."""
    targets = s.client().targets
    port = error.address.rpartition(":")[2]
    service = next((name for name, target in targets.items() if port and target.endswith(f":{port}")), "")
    where = f"{targets[service]} ({service})" if service else error.address or "the configured address"
    if error.refused:
        return LocalError(f"nothing answers at {where}: the stack is not running? start it with `make up` "
                          "(or `fastserve up`)")
    return LocalError(f"cannot connect to {where}: {error.message}")


def group(help: str) -> typer.Typer:
    return typer.Typer(help=help, no_args_is_help=True, add_completion=False)


# -- what commands declare: the flags of request fields ------------------------------------------------

SOURCE_FLAGS: Flags = {"source": "--source", "source.builtin.seed": "--seed",
                       "source.builtin.max_documents": "--max-documents", "source.builtin.top_labels": "--top-labels"}
"""The corpus source of every preprocessing job command."""


# -- output --------------------------------------------------------------------------------------------

_STRUCTS = frozenset({"google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"})


def to_dict(message: Message) -> dict[str, Any]:
    """The message as JSON data, with the numbers of its Struct and Value fields (a job's params, result
    and event data) that are whole given back as integers (`num_heads: 4`, not `4.0`); every other
    field keeps its type (a progress of 1.0 stays a float)."""
    data = json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True, unquote_int64_if_possible=True)
    return _whole_structs(message.DESCRIPTOR, data)


def _whole_structs(descriptor: Descriptor, value: Any) -> Any:
    if descriptor.full_name in _STRUCTS:
        return whole(value)
    if not isinstance(value, dict):
        return value  # a well-known type written as a string or number (Timestamp, Duration, wrappers)
    for f in descriptor.fields:
        if f.message_type is None or f.name not in value:
            continue
        inner = value[f.name]
        if f.message_type.GetOptions().map_entry:
            item = f.message_type.fields_by_name["value"].message_type
            if item is not None:
                value[f.name] = {k: _whole_structs(item, v) for k, v in inner.items()}
        elif isinstance(inner, list):
            value[f.name] = [_whole_structs(f.message_type, v) for v in inner]
        else:
            value[f.name] = _whole_structs(f.message_type, inner)
    return value


def whole(value: Any) -> Any:
    """Counts as integers again: a Struct holds every number as a double (497.0 documents)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: whole(v) for k, v in value.items()}
    if isinstance(value, list):
        return [whole(v) for v in value]
    return value


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
    sys.stdout.flush()


FOLD_MIN = 16
"""The narrowest a folding column gets, so that a URI folds into readable pieces."""


def table(*headers: str, long: Collection[str] = (), title: str | None = None) -> Table:
    """A table for `print_table`: the `long` columns (URIs, messages, free text) fold onto more lines
    when the terminal is narrow; every other column (ids, names, states, enum words, numbers) is whole."""
    # Two spaces between columns and a rule under the headers: every character for the columns.
    result = Table(box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0), title=title)
    for header in headers:
        result.add_column(header, overflow="fold" if header in long else "ellipsis", no_wrap=header not in long)
    return result


def print_table(ctx: typer.Context, table: Table) -> None:
    """Print any table at the right width: a terminal's (or COLUMNS), where the columns made with
    overflow "fold" fold and no other column is ever cut, even when that makes the table wider than
    the terminal; when stdout is not a terminal and COLUMNS is unset, or with `--wide`, each row is
    one line with every column in full."""
    wide = state(ctx).wide
    limit = None if wide or not (console.is_terminal or os.environ.get("COLUMNS")) else console.width
    options = console.options.update_width(1 << 20)
    natural, least = [], []
    for column in table.columns:
        width = max(Measurement.get(console, options, cell).maximum for cell in (column.header, *column.cells))
        folds = column.overflow == "fold" and limit is not None
        column.no_wrap, column.min_width = not folds, min(width, FOLD_MIN) if folds else width
        natural.append(width)
        least.append(column.min_width)
    _, right, _, left = table.padding
    extra = len(table.columns) * (left + right) + ((2 if table.show_edge else 0) + len(table.columns) - 1
                                                   if table.box else 0)
    full = sum(natural) + extra
    table.width = full if limit is None else max(sum(least) + extra, min(limit, full))
    console.print(table)


def error_line(text: str) -> None:
    errors.print(Text(text, style="bold red"))
