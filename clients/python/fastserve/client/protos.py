"""Small conversions of protobuf values that the client, the CLI and the servers all use."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format, struct_pb2


def enum_name(enum_type, value: int, prefix: str) -> str:
    """`TOKENIZER_MODEL_BPE` -> `bpe`: a request's enum as the core's lower-case word (`unspecified` for 0,
    which each core either defaults or refuses, naming the field)."""
    return enum_type.Name(value).removeprefix(prefix).lower()


def struct_to_dict(message: struct_pb2.Struct) -> dict[str, Any]:
    return json_format.MessageToDict(message)
