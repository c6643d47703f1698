"""Reading what a server sent back, written apart from the code under test: the fields a
google.rpc.BadRequest (or a core's exception) names, and KServe's length-prefixed BYTES tensors."""

from __future__ import annotations

import struct

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from fastserve.runtime.errors import FastServeError


def fields_of(error: grpc.RpcError | FastServeError) -> list[str]:
    """Every field an error names, in order: a gRPC error's BadRequest detail (which must be there), or a
    core's exception's violations."""
    if isinstance(error, FastServeError):
        return [v.field for v in error.violations]
    bad = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad) for d in rpc_status.from_call(error).details), "no BadRequest detail"
    return [v.field for v in bad.field_violations]


def field_of(error: grpc.RpcError | FastServeError) -> str:
    """The one field an error names. It must name exactly one: where a request has several offending fields,
    a test compares `fields_of` with all of them, so one that stops being reported is caught."""
    fields = fields_of(error)
    assert len(fields) == 1, f"expected one offending field, the error names {fields}"
    return fields[0]


def raw_bytes(items: list[bytes]) -> bytes:
    """A BYTES tensor as raw contents: each element a 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(i)) + i for i in items)


def from_raw_bytes(raw: bytes) -> list[bytes]:
    items, offset = [], 0
    while offset < len(raw):
        (length,) = struct.unpack_from("<I", raw, offset)
        items.append(raw[offset + 4:offset + 4 + length])
        offset += 4 + length
    return items
