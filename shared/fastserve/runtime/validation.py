"""What every request of every service must satisfy before a servicer sees it, checked by its descriptor.

proto3 accepts any integer for an enum and any float, and protobuf bounds neither a string's length nor how
deep a `google.protobuf.Struct` nests: the cores would meet unknown enum values, NaN and megabytes of text
in places that never expect them. `check_request` walks a message once, generically, and raises
`InvalidArgument` naming the field path (`config.backend`, `steps[1].quantize.method`,
`options.lowercase`) of the first violation. The error interceptor runs it on every request message.
"""

from __future__ import annotations

import math
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from fastserve.runtime.errors import InvalidArgument

__all__ = ["MAX_STRING_BYTES", "MAX_STRUCT_DEPTH", "check_request"]

MAX_STRING_BYTES = 1024 * 1024
"""Longest string field. No string field is documented larger: payloads that are (corpus chunks, KServe
raw tensors) are `bytes`, which only the message-size limit bounds."""

MAX_STRUCT_DEPTH = 32
"""How deep Struct and ListValue values may nest in one request (JSON options, job parameters)."""

_FLOATS = (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT)
_STRUCT, _LIST, _VALUE = "google.protobuf.Struct", "google.protobuf.ListValue", "google.protobuf.Value"


def check_request(message: Message) -> None:
    """Raise `InvalidArgument` for the first unknown enum value, non-finite float, over-long string or
    over-deep Struct in `message`."""
    _message(message, "", 0)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _message(message: Message, path: str, depth: int) -> None:
    name = message.DESCRIPTOR.full_name
    if name in (_STRUCT, _LIST, _VALUE):
        _json(message, path, depth)
        return
    for field, value in message.ListFields():
        where = _join(path, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            _map(field, value, where, depth)
        elif field.is_repeated:
            _repeated(field, value, where, depth)
        else:
            _single(field, value, where, depth)


def _map(field: FieldDescriptor, entries: Any, path: str, depth: int) -> None:
    key_field = field.message_type.fields_by_name["key"]
    value_field = field.message_type.fields_by_name["value"]
    for key, value in entries.items():
        if key_field.type == FieldDescriptor.TYPE_STRING:
            _string(key, f"{path} (a key)")
            where = f"{path}.{key}"
        else:
            where = f"{path}[{key}]"
        _single(value_field, value, where, depth)


def _repeated(field: FieldDescriptor, values: Any, path: str, depth: int) -> None:
    if field.type in _FLOATS:
        # A C-level scan: tensors of a million floats pass in milliseconds.
        if not all(map(math.isfinite, values)):
            bad = next(i for i, v in enumerate(values) if not math.isfinite(v))
            _refuse(f"{path}[{bad}]", f"must be a finite number, got {values[bad]}")
        return
    if field.type == FieldDescriptor.TYPE_BYTES:
        return
    for i, value in enumerate(values):
        _single(field, value, f"{path}[{i}]", depth)


def _single(field: FieldDescriptor, value: Any, path: str, depth: int) -> None:
    kind = field.type
    if kind == FieldDescriptor.TYPE_MESSAGE:
        _message(value, path, depth)
    elif kind == FieldDescriptor.TYPE_ENUM:
        if value not in field.enum_type.values_by_number:
            _refuse(path, f"{value} is not a value of {field.enum_type.name}")
    elif kind in _FLOATS:
        if not math.isfinite(value):
            _refuse(path, f"must be a finite number, got {value}")
    elif kind == FieldDescriptor.TYPE_STRING:
        _string(value, path)


def _string(value: str, path: str) -> None:
    # A character is at most 4 UTF-8 bytes: only long strings need encoding to be measured.
    if len(value) * 4 > MAX_STRING_BYTES and len(value.encode("utf-8", "surrogatepass")) > MAX_STRING_BYTES:
        _refuse(path, f"is longer than {MAX_STRING_BYTES} bytes")


def _json(message: Message, path: str, depth: int) -> None:
    """Struct, ListValue and Value, with JSON-like paths (`options.keep.0` is `options.keep[0]`)."""
    name = message.DESCRIPTOR.full_name
    if name == _VALUE:
        kind = message.WhichOneof("kind")
        if kind == "number_value" and not math.isfinite(message.number_value):
            _refuse(path, f"must be a finite number, got {message.number_value}")
        elif kind == "string_value":
            _string(message.string_value, path)
        elif kind in ("struct_value", "list_value"):
            _json(getattr(message, kind), path, depth)
        return
    if depth >= MAX_STRUCT_DEPTH:
        _refuse(path, f"nests deeper than {MAX_STRUCT_DEPTH} levels")
    if name == _STRUCT:
        for key, value in message.fields.items():
            _string(key, f"{path} (a key)")
            _json(value, _join(path, key), depth + 1)
    else:
        for i, value in enumerate(message.values):
            _json(value, f"{path}[{i}]", depth + 1)


def _refuse(path: str, problem: str) -> None:
    raise InvalidArgument(f"{path} {problem}", field=path)
