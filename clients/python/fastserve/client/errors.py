"""`ClientError`: what a failed call raises, with the status the server's error interceptor built."""

from __future__ import annotations

import re
from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from fastserve.common.v1 import errors_pb2

# How gRPC core words a call that reached no server: `failed to connect to all addresses; last error:
# UNKNOWN: ipv4:127.0.0.1:50054: Failed to connect to remote host: Connection refused`.
_UNREACHABLE = re.compile(r"failed to connect to all addresses|Failed to connect to remote host")
_REFUSED = "Connection refused"
_ADDRESS = re.compile(r"\bipv[46]:(\[[^\]]*\]|[^\s:]+):(\d+)")


def reached_no_server(code: grpc.StatusCode, message: str) -> bool:
    """Whether an UNAVAILABLE means that the call reached no server (nothing listens at the port, or
    the connection failed before any call), as opposed to a server that could not take the call."""
    return code == grpc.StatusCode.UNAVAILABLE and _UNREACHABLE.search(message) is not None


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request, as the server's `google.rpc.BadRequest` names it."""

    field: str
    description: str


class ClientError(Exception):
    """A call that failed: its gRPC `code`, the server's `message`, the `violations` of a bad request
    (from `google.rpc.BadRequest`), the `request_id` to find the server's log line, and how many
    `attempts` were made (more than one only for retried idempotent calls)."""

    def __init__(self, code: grpc.StatusCode, message: str, violations: list[FieldViolation] | None = None,
                 request_id: str = "", service: str = "", attempts: int = 1) -> None:
        self.code, self.message = code, message
        self.violations = list(violations or [])
        self.request_id, self.service, self.attempts = request_id, service, attempts
        super().__init__(self.line())

    @property
    def fields(self) -> list[str]:
        return [v.field for v in self.violations]

    @property
    def unreachable(self) -> bool:
        """The call reached no server (see `reached_no_server`)."""
        return reached_no_server(self.code, self.message)

    @property
    def refused(self) -> bool:
        """The connection was refused: nothing listens at the address (a stopped server)."""
        return self.unreachable and _REFUSED in self.message

    @property
    def address(self) -> str:
        """`127.0.0.1:50054`: the address of an unreachable call, as gRPC names it ('' if it names none)."""
        found = _ADDRESS.search(self.message) if self.unreachable else None
        return f"{found.group(1)}:{found.group(2)}" if found else ""

    def line(self) -> str:
        """`INVALID_ARGUMENT: the batch is empty (field texts)`: one line for a user."""
        text = f"{self.code.name}: {self.message}"
        if self.fields:
            text += f" (field{'s' if len(self.fields) > 1 else ''} {', '.join(self.fields)})"
        if self.attempts > 1:
            text += f" after {self.attempts} attempts"
        return text

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError, attempts: int = 1) -> ClientError:
        code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
        message = (error.details() if callable(getattr(error, "details", None)) else "") or str(error)
        violations, request_id, service = [], "", ""
        # Connection failures carry no status details; from_call then returns None.
        status = rpc_status.from_call(error) if hasattr(error, "trailing_metadata") else None
        for detail in status.details if status else ():
            bad, info = error_details_pb2.BadRequest(), errors_pb2.ErrorDetail()
            if detail.Unpack(bad):
                violations += [FieldViolation(v.field, v.description) for v in bad.field_violations]
            elif detail.Unpack(info):
                request_id, service = info.request_id, info.service
        return cls(code or grpc.StatusCode.UNKNOWN, message, violations, request_id, service, attempts)
