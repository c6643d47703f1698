"""Process-wide logging, configured once at each entry point; modules use `logging.getLogger(__name__)`.

Every record carries the service name and, inside an RPC, the request id that the error interceptor
also returns to the caller, so a client's `request id` leads straight to the log line.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

from fastserve.runtime.noise import silence_import_noise

# At import, before any service module imports torchao: servers and the worker import this module first.
silence_import_noise()

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

_configured = False


class _ContextFilter(logging.Filter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def filter(self, record: logging.LogRecord) -> bool:
        record.service = self.service
        record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": getattr(record, "service", "-"),
            "request_id": getattr(record, "request_id", "-"),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


HUMAN_FORMAT = "%(asctime)s %(levelname)-7s %(service)s [%(request_id)s] %(name)s: %(message)s"


def setup_logging(service: str, log_format: str = "human", level: str = "INFO") -> None:
    """Configure the root logger for this process. Later calls are ignored: one process, one setup."""
    global _configured
    if _configured:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ContextFilter(service))
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(HUMAN_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    _configured = True
