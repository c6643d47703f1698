"""Reading what a server sent back, written apart from the code under test: the field a
google.rpc.BadRequest names, and KServe's length-prefixed BYTES tensors."""

from __future__ import annotations

import struct

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


def field_of(error: grpc.RpcError) -> str:
    """The field of the first violation in the error's BadRequest detail (which must be there)."""
    bad = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad) for d in rpc_status.from_call(error).details)
    return bad.field_violations[0].field


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
