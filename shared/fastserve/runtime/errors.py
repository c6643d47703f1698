"""Domain exceptions raised by the cores.

Cores know nothing of gRPC: they raise these, and one server interceptor (`fastserve.runtime.interceptors`) maps
each class to its status code. `reason` names the matching `fastserve.common.v1.ErrorReason`.
"""

from __future__ import annotations

from dataclasses import dataclass


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
