"""`ClientError`: what a failed call raises, with the status the server's error interceptor built."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from fastserve.common.v1 import errors_pb2


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
