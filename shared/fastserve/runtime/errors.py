"""Domain exceptions raised by the cores.

Cores know nothing of gRPC: they raise these, and one server interceptor (`fastserve.runtime.interceptors`) maps
each class to its status code. `reason` names the matching `fastserve.common.v1.ErrorReason`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

HOME_LABEL = "$FASTSERVE_HOME"

# An absolute path of at least two parts, not part of a URI (`artifact://a/b`) or a relative path (`a/b`).
_ABSOLUTE_PATH = re.compile(r"(?<![\w:/.~$-])/(?:[\w.@+=,-]+/)+[\w.@+=,-]*")


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request: its path (`hyperparameters.learning_rate`) and what is wrong."""

    field: str
    description: str


class FastServeError(Exception):
    """Base of all domain errors; `message` is safe to show to the caller. `field` (or `violations`)
    names the request fields at fault, whatever the code: the malformed field of an INVALID_ARGUMENT,
    and as well the field that named a missing artifact (NOT_FOUND) or an unusable one
    (FAILED_PRECONDITION), so that a client can point at what the user typed."""

    reason = "INTERNAL"

    def __init__(self, message: str, field: str | None = None,
                 violations: list[FieldViolation] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.violations = list(violations or [])
        if field is not None:
            self.violations.insert(0, FieldViolation(field, message))


class InvalidArgument(FastServeError):
    """The request is malformed; `violations` names each offending field."""

    reason = "INVALID_ARGUMENT"


class NotFound(FastServeError):
    reason = "NOT_FOUND"


class AlreadyExists(FastServeError):
    reason = "ALREADY_EXISTS"


class FailedPrecondition(FastServeError):
    """The request is well formed but the system is not in a state to run it."""

    reason = "FAILED_PRECONDITION"


class ResourceExhausted(FastServeError):
    """A queue, memory or quota limit was hit; retrying later may work."""

    reason = "RESOURCE_EXHAUSTED"


class Unavailable(FastServeError):
    """A dependency (Redis, a model not yet ready) cannot serve now."""

    reason = "UNAVAILABLE"


class DeadlineExceeded(FastServeError):
    reason = "DEADLINE_EXCEEDED"


class Cancelled(FastServeError):
    reason = "CANCELLED"


class Unauthenticated(FastServeError):
    reason = "UNAUTHENTICATED"


def without_paths(text: str, home: str = "") -> str:
    """`text` fit to send to a client: the FASTSERVE_HOME prefix reads `$FASTSERVE_HOME`, any other absolute
    path is cut to its last two parts (`…/models/1`). Server paths tell a caller nothing it can use and an
    attacker where things are."""
    if home.startswith("/") and home != "/":
        text = text.replace(home.rstrip("/"), HOME_LABEL)
    return _ABSOLUTE_PATH.sub(lambda m: "…/" + "/".join(m.group(0).rstrip("/").split("/")[-2:]), text)


def error_gist(exc: BaseException, limit: int = 300) -> str:
    """The gist of a library's error, fit for a client: some span pages (a whole state-dict diff, a C++
    backtrace), and most name the absolute path of the file they could not read."""
    text = str(exc).strip().splitlines()
    return without_paths(text[0])[:limit] if text else "no message"
