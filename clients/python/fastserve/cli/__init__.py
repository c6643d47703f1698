"""`fastserve`: the user's entry point. Its service commands call every service through
`fastserve.client`, each a thin layer over one client call; the server package, when installed, adds
the local stack's commands (up, down, status, config, demo) through the `fastserve.cli` entry points.

An error is one line on stderr and a non-zero exit, never a traceback: a failed call prints its
gRPC code, message and what was wrong, named as the user typed it (`(option --temperature)`, `(option
--arch num_layers=)`, from the command's `Flags`; a field no flag sets stays `(field <path>)`), exit 1;
a local problem prints `fastserve: <message>` (exit 2), and so does a call that reached no server
(`fastserve: nothing answers at 127.0.0.1:50054 (inference): the stack is not running? ...`).

`--json` prints protobuf's JSON mapping of the reply, field names as in the proto, with one change:
the numbers of Struct and Value fields (a job's params, result and event data), which protobuf holds
as doubles, are integers again when they are whole (`"num_heads": 4`, not `4.0`); every other field
keeps its type, so a float field stays a float (`"progress": 1.0`).

Tables fit the terminal (or COLUMNS): long columns (URIs, messages) fold, the others (ids, names,
states, enum words, numbers) are never cut. When stdout is not a terminal and COLUMNS is unset, or
with `--wide`, every row is one line with each column in full.
"""

from __future__ import annotations

import logging
import re
import sys
from importlib.metadata import entry_points
from typing import Annotated

import typer

from fastserve.cli import artifacts, chat, health, inference, optimize, preprocess, train
from fastserve.cli.common import JSON_HELP, WIDE_HELP, FailedCall, Flags, LocalError, State, error_line
from fastserve.client.errors import ClientError
from fastserve.client.settings import ClientSettings, SettingError

PLUGIN_GROUP = "fastserve.cli"
"""Entry points `register(app)` that add commands: the server package's stack commands."""


def _exit_code(result: int | None, **_) -> None:
    # Commands return their exit status; typer would drop it.
    raise typer.Exit(result if isinstance(result, int) else 0)


app = typer.Typer(help="FastServe: from raw text to a fast endpoint.", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False, result_callback=_exit_code)


@app.callback()
def root(ctx: typer.Context,
         json_output: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
         wide: Annotated[bool, typer.Option("--wide", help=WIDE_HELP)] = False,
         host: Annotated[str | None, typer.Option(help="Host of the services; default from FASTSERVE_HOST.")] = None,
         token: Annotated[str | None, typer.Option(help="Bearer token; default FASTSERVE_AUTH_TOKEN.")] = None,
         tls_ca: Annotated[str | None, typer.Option(help="PEM roots to trust; turns TLS on. Default "
                                                         "FASTSERVE_TLS_CERT.")] = None,
         timeout: Annotated[float | None, typer.Option(
             help="Deadline of every call, in seconds; default: each call's own (10 for a read, 60 for embed or "
                  "classify, 300 for a generation, 600 for a model load).")] = None) -> None:
    settings = ClientSettings.from_env()
    logging.basicConfig(level=settings.log_level, format="%(levelname)s %(name)s: %(message)s")
    overrides = {k: v for k, v in (("token", token), ("tls_ca", tls_ca), ("timeout", timeout)) if v is not None}
    ctx.obj = State(settings, json_output, host, overrides, wide)
    ctx.call_on_close(ctx.obj.close)


app.add_typer(preprocess.app, name="preprocess")
app.add_typer(train.app, name="train")
app.add_typer(optimize.app, name="optimize")
inference.register(app)
chat.register(app)
preprocess.register(app)
health.register(app)
artifacts.register(app)
for plugin in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
    plugin.load()(app)


def main(argv: list[str] | None = None) -> int:
    try:
        # Standalone: typer prints usage errors and help and exits; what a command raises comes here.
        typer.main.get_command(app).main(args=sys.argv[1:] if argv is None else argv, prog_name="fastserve")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except FailedCall as exc:
        error_line(flagged_line(exc.error, exc.flags))
        return 1
    except ClientError as exc:
        error_line(exc.line())
        return 1
    except (LocalError, SettingError) as exc:
        error_line(f"fastserve: {exc.message}")
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - one clear line for the user; details in the logs
        logging.getLogger(__name__).debug("unexpected error", exc_info=exc)
        error_line(f"fastserve: {type(exc).__name__}: {exc}")
        return 1


def flagged_line(error: ClientError, flags: Flags) -> str:
    """`INVALID_ARGUMENT: num_layers must be in [1, 128] (option --arch num_layers=)`: the error's line
    with each offending field named by the flag or argument that set it, where `flags` has one."""
    text = f"{error.code.name}: {error.message}"
    named = list(dict.fromkeys(_named(field, flags) for field in error.fields))
    if named:
        text += f" ({', '.join(named)})"
    if error.attempts > 1:
        text += f" after {error.attempts} attempts"
    return text


def _named(field: str, flags: Flags) -> str:
    flag = flag_of(field, flags)
    if flag is None:
        return f"field {field}"
    return f"option {flag}" if flag.startswith("-") else f"argument {flag}"


def flag_of(field: str, flags: Flags) -> str | None:
    """The flag of a request field path under `flags` (see `Flags`: the longest matching key wins)."""
    for key in sorted(flags, key=len, reverse=True):
        if key.endswith(".*"):
            base = key[:-1]
            if field.startswith(base) and len(field) > len(base):
                name = re.split(r"[.\[]", field[len(base):], maxsplit=1)[0]
                return flags[key].format(name)
        elif field == key or field.startswith((f"{key}.", f"{key}[")):
            return flags[key]
    return None


if __name__ == "__main__":
    sys.exit(main())
