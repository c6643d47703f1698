"""`fastserve`: the user's entry point. This first version manages the local stack."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from shared.config import Config, describe
from shared.errors import FastServeError
from shared.logs import setup_logging
from shared.stack import Stack


def _up(args: argparse.Namespace, config: Config) -> int:
    components = Stack(config).up(timeout=args.timeout)
    for c in components:
        print(f"{c.name:<14} pid {c.pid:<8} {'port ' + str(c.port) if c.port else ''}")
    print(f"FastServe is up (state and logs under {config.home}); stop it with `make down`.")
    return 0


def _down(args: argparse.Namespace, config: Config) -> int:
    stopped = Stack(config).down()
    print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
    return 0


def _status(args: argparse.Namespace, config: Config) -> int:
    rows = Stack(config).status()
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print("the stack is not running (start it with `make up`)")
    for row in rows if not args.json else []:
        port = f"port {row['port']}" if row["port"] else ""
        print(f"{row['name']:<14} {row['state']:<12} pid {row['pid']:<8} {port}")
    return 0 if rows and all(r["state"] in ("SERVING", "RUNNING") for r in rows) else 3


def _health(args: argparse.Namespace, config: Config) -> int:
    from shared.channels import health_status, open_channel

    with open_channel(f"{args.host}:{args.port}", config) as channel:
        state = health_status(channel, args.service)
    print(state)
    return 0 if state == "SERVING" else 1


def _config(args: argparse.Namespace, config: Config) -> int:
    for env, default, doc in describe():
        print(f"{env}  (default {default!r})\n    {doc}")
    return 0


def _demo(args: argparse.Namespace, config: Config) -> int:
    from shared.demo import run_demo

    return run_demo(config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastserve", description="FastServe: from raw text to a fast endpoint.")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the local stack in the background and wait until it serves")
    up.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for every health check")
    up.set_defaults(run=_up)
    sub.add_parser("down", help="stop exactly what `up` started").set_defaults(run=_down)
    status = sub.add_parser("status", help="show the stack's processes and health")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(run=_status)
    health = sub.add_parser("health", help="ask one server's standard health service (exit 0 when SERVING)")
    health.add_argument("--host", default="127.0.0.1")
    health.add_argument("--port", type=int, required=True)
    health.add_argument("--service", default="", help="a full service name; empty for the whole server")
    health.set_defaults(run=_health)
    sub.add_parser("config", help="list every FASTSERVE_* setting").set_defaults(run=_config)
    sub.add_parser("demo", help="run the demo against a fresh local stack").set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = Config.from_env()
        setup_logging("cli", config.log_format, "WARNING" if config.log_level == "INFO" else config.log_level)
        return args.run(args, config)
    except FastServeError as exc:
        print(f"fastserve: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - one clear line for the user; details in the logs
        logging.getLogger(__name__).debug("unexpected error", exc_info=exc)
        print(f"fastserve: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
