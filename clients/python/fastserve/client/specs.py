"""Request parts from short strings, so that scripts and the CLI need not spell out protobuf messages:
enum words (`bpe`, `causal_lm`), corpus sources, cleaning and optimization steps, and `key=value`
options of any flat message. A bad string raises the same `ClientError` a server would: its violation
names the request's field path, its message only the field's own name, so that a caller that names the
field its own way (the CLI: a flag) can."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import grpc
from google.protobuf.descriptor import EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from fastserve.client.errors import ClientError, FieldViolation
from fastserve.optimization.v1 import optimization_pb2 as opt_pb
from fastserve.preprocessing.v1 import preprocessing_pb2 as pre_pb

_INTS = {FieldDescriptor.CPPTYPE_INT32, FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT32,
         FieldDescriptor.CPPTYPE_UINT64}
_FLOATS = {FieldDescriptor.CPPTYPE_FLOAT, FieldDescriptor.CPPTYPE_DOUBLE}


def invalid(field: str, message: str) -> ClientError:
    return ClientError(grpc.StatusCode.INVALID_ARGUMENT, message, [FieldViolation(field, message)])


def leaf(field: str) -> str:
    """`steps[0].prune.method` -> `method`: a field path's last name."""
    return field.rsplit(".", 1)[-1].split("[", 1)[0]


def enum_choices(enum: Any) -> list[str]:
    """The words an enum accepts: `TOKENIZER_MODEL_BPE` -> `bpe`, without UNSPECIFIED."""
    descriptor = _descriptor(enum)
    prefix = _prefix(descriptor)
    return [v.name.removeprefix(prefix).lower() for v in descriptor.values if not v.name.endswith("_UNSPECIFIED")]


def enum_value(enum: Any, value: str | int, field: str) -> int:
    """`bpe`, `BPE` or `TOKENIZER_MODEL_BPE` (or the number) as the enum's number."""
    if isinstance(value, int):
        return value
    descriptor = _descriptor(enum)
    name = value.strip().upper().replace("-", "_")
    found = descriptor.values_by_name.get(name) or descriptor.values_by_name.get(_prefix(descriptor) + name)
    if found is None or found.name.endswith("_UNSPECIFIED"):
        raise invalid(field, f"{leaf(field)} must be one of {', '.join(enum_choices(descriptor))}, got {value!r}")
    return found.number


def _descriptor(enum: Any) -> EnumDescriptor:
    return enum if isinstance(enum, EnumDescriptor) else enum.DESCRIPTOR


def _prefix(descriptor: EnumDescriptor) -> str:
    # Every FastServe enum starts with <NAME>_UNSPECIFIED = 0 (buf lint enforces it).
    return descriptor.values_by_number[0].name.removesuffix("UNSPECIFIED")


def options(text: str, field: str) -> dict[str, str]:
    """`a=1,b=x` as {"a": "1", "b": "x"}."""
    result = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise invalid(field, f"expected key=value, got {item!r}")
        result[key.strip()] = value.strip()
    return result


def fill(message: Message, values: Mapping[str, Any], field: str) -> Message:
    """Set scalar and enum fields of `message` from `values` (strings are parsed by field type)."""
    for key, raw in values.items():
        where = f"{field}.{key}" if field else key
        descriptor = message.DESCRIPTOR.fields_by_name.get(key)
        if descriptor is None or descriptor.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE or descriptor.is_repeated:
            settable = [f.name for f in message.DESCRIPTOR.fields
                        if f.cpp_type != FieldDescriptor.CPPTYPE_MESSAGE and not f.is_repeated]
            raise invalid(where, f"unknown option {key!r}; one of {', '.join(settable)}")
        setattr(message, key, _scalar(descriptor, raw, where))
    return message


def _scalar(descriptor: FieldDescriptor, raw: Any, where: str) -> Any:
    try:
        if descriptor.cpp_type == FieldDescriptor.CPPTYPE_ENUM:
            return enum_value(descriptor.enum_type, raw, where)
        if descriptor.cpp_type == FieldDescriptor.CPPTYPE_BOOL:
            if isinstance(raw, bool):
                return raw
            if str(raw).lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return str(raw).lower() in ("true", "1", "yes")
        if descriptor.cpp_type in _INTS:
            return int(raw)
        if descriptor.cpp_type in _FLOATS:
            return float(raw)
        return str(raw)
    except ValueError:
        raise invalid(where, f"{descriptor.name} does not take {raw!r}") from None


def corpus_source(spec: str | pre_pb.CorpusSource, seed: int = 0, max_documents: int = 0,
                  top_labels: int = 0) -> pre_pb.CorpusSource:
    """`artifact://corpora/<name>/<version>`, or a built-in corpus by name (`stdlib-docstrings`,
    `builtin://stdlib-docstrings`) with its seed, size and label limits."""
    if isinstance(spec, pre_pb.CorpusSource):
        return spec
    if spec.startswith("artifact://"):
        return pre_pb.CorpusSource(artifact_uri=spec)
    return pre_pb.CorpusSource(builtin=pre_pb.BuiltinCorpus(
        name=spec.removeprefix("builtin://"), seed=seed, max_documents=max_documents, top_labels=top_labels))


def clean_step(spec: str | pre_pb.CleanStep, field: str = "steps") -> pre_pb.CleanStep:
    """`length_filter,min_chars=10,max_chars=1000`: a step and its options (JSON values, else strings)."""
    if isinstance(spec, pre_pb.CleanStep):
        return spec
    name, _, rest = spec.partition(",")
    step = pre_pb.CleanStep(name=name.strip())
    if rest:
        step.options.update({k: _json_or_text(v) for k, v in options(rest, field).items()})
    return step


def _json_or_text(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


_STEP_KINDS = {"export": ("export", opt_pb.ExportStep, "format"),
               "quantize": ("quantize", opt_pb.QuantizeStep, "method"),
               "prune": ("prune", opt_pb.PruneStep, "method")}


def optimization_step(spec: str | opt_pb.OptimizationStep, field: str = "steps") -> opt_pb.OptimizationStep:
    """`export:onnx`, `quantize:onnx_int8_dynamic`, `prune:magnitude_unstructured,sparsity=0.5`: the
    step, its format or method, then any other field of the step as key=value."""
    if isinstance(spec, opt_pb.OptimizationStep):
        return spec
    head, _, rest = spec.partition(",")
    kind, _, method = head.partition(":")
    if kind.strip() not in _STEP_KINDS or not method.strip():
        raise invalid(field, f"a step is export:<format>, quantize:<method> or prune:<method>[,key=value], "
                             f"got {spec!r}")
    oneof, message_type, first = _STEP_KINDS[kind.strip()]
    step = fill(message_type(), {first: method, **options(rest, f"{field}.{oneof}")}, f"{field}.{oneof}")
    return opt_pb.OptimizationStep(**{oneof: step})
