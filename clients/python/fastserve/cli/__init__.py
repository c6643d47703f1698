"""`fastserve`: the user's entry point. Its service commands call every service through
`fastserve.client`, each a thin layer over one client call; the server package, when installed, adds
the local stack's commands (up, down, status, config, demo) through the `fastserve.cli` entry points.

An error is one line on stderr and a non-zero exit, never a traceback: a failed call prints its
gRPC code, message and offending fields (exit 1); a local problem prints `fastserve: <message>`
(exit 2).
"""

from __future__ import annotations

import logging
import sys
from importlib.metadata import entry_points
from typing import Annotated

import typer

from fastserve.cli import health, inference, optimize, preprocess, train
from fastserve.cli.common import LocalError, State, error_line
from fastserve.client import ClientError
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
         json_output: Annotated[bool, typer.Option("--json", help="Machine-readable output (JSON).")] = False,
         host: Annotated[str | None, typer.Option(help="Host of the services; default from FASTSERVE_HOST.")] = None,
         token: Annotated[str | None, typer.Option(help="Bearer token; default FASTSERVE_AUTH_TOKEN.")] = None,
         tls_ca: Annotated[str | None, typer.Option(help="PEM roots to trust; turns TLS on. Default "
                                                         "FASTSERVE_TLS_CERT.")] = None,
         timeout: Annotated[float | None, typer.Option(help="Deadline of every call, in seconds.")] = None) -> None:
    settings = ClientSettings.from_env()
    logging.basicConfig(level=settings.log_level, format="%(levelname)s %(name)s: %(message)s")
    overrides = {k: v for k, v in (("token", token), ("tls_ca", tls_ca), ("timeout", timeout)) if v is not None}
    ctx.obj = State(settings, json_output, host, overrides)
    ctx.call_on_close(ctx.obj.close)


app.add_typer(preprocess.app, name="preprocess")
app.add_typer(train.app, name="train")
app.add_typer(optimize.app, name="optimize")
inference.register(app)
health.register(app)
for plugin in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
    plugin.load()(app)


def main(argv: list[str] | None = None) -> int:
    try:
        # Standalone: typer prints usage errors and help and exits; what a command raises comes here.
        typer.main.get_command(app).main(args=sys.argv[1:] if argv is None else argv, prog_name="fastserve")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
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


if __name__ == "__main__":
    sys.exit(main())
