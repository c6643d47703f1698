"""KServe v2 REST bodies <-> the KServe v2 gRPC messages, as pure functions (the routes are `kserve_rest`).

An infer request is JSON, or (the binary tensor extension) a JSON header of `Inference-Header-Content-Length`
bytes followed by the raw tensors in input order, each input naming its byte count in
`parameters.binary_data_size`. Either way every input leaves as `raw_input_contents` (BYTES elements as
a 4-byte little-endian length and their bytes, numbers little-endian), the form the gRPC servicer reads
first; so JSON `data` is converted here, checked against its shape and datatype. Every size is checked
before anything is allocated from it: the body, the header, a tensor's declared element count.

A response output is binary when its `parameters.binary_data` says so, else when the request's
`binary_data_output` does; binary outputs follow the JSON header in output order, with
`binary_data_size` in their parameters, and the header's length goes back in the response header.

Failures are `KServeError`s: an HTTP status and a message that names the field, which the routes send
as KServe's `{"error": "<message>"}`.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field

import grpc
import numpy as np

from fastserve.kserve.v2 import grpc_service_pb2 as kpb

MAX_BODY_BYTES = 64 << 20
# JSON parses to Python objects many times its size, so the JSON part is held to less than the body.
MAX_HEADER_BYTES = 16 << 20
HEADER_LENGTH = "Inference-Header-Content-Length"

# Fixed-size datatypes by their little-endian numpy dtype; BF16 has none in numpy, BYTES no fixed size.
_NUMPY = {"BOOL": "?", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "<i1",
          "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}
DATATYPES = (*_NUMPY, "BF16", "BYTES")
# Triton's model-config names of the datatypes, for GET .../config.
CONFIG_TYPES = {**{d: f"TYPE_{d}" for d in DATATYPES}, "BYTES": "TYPE_STRING"}
# The most dimensions a tensor (and so a nested JSON `data` list) may have.
MAX_DIMS = 32

# gRPC codes to HTTP statuses as Triton's HTTP endpoint maps them; UNAUTHENTICATED and PERMISSION_DENIED
# are the gateway's own credentials failing at the inference service: a bad gateway, not the caller's fault.
STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.OUT_OF_RANGE: 400,
          grpc.StatusCode.FAILED_PRECONDITION: 400, grpc.StatusCode.NOT_FOUND: 404,
          grpc.StatusCode.ALREADY_EXISTS: 409, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
          grpc.StatusCode.CANCELLED: 499, grpc.StatusCode.UNIMPLEMENTED: 501, grpc.StatusCode.UNAVAILABLE: 503,
          grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.UNAUTHENTICATED: 502,
          grpc.StatusCode.PERMISSION_DENIED: 502}


class KServeError(Exception):
    """A refused or failed /v2 request: its HTTP `status` and the message of its `{"error": ...}` body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def bad(where: str, message: str) -> KServeError:
    return KServeError(400, f"{where}: {message}")


def http_status(code: grpc.StatusCode) -> int:
    return STATUS.get(code, 500)


@dataclass
class InferCall:
    """A parsed infer request: the gRPC message, and which outputs go back binary."""

    request: kpb.ModelInferRequest
    binary_default: bool = False
    binary_outputs: dict[str, bool] = field(default_factory=dict)

    def binary(self, name: str) -> bool:
        return self.binary_outputs.get(name, self.binary_default)


# ---- bytes ----

def encode_bytes(items: list[bytes]) -> bytes:
    """A raw BYTES tensor: each element a uint32 little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def decode_bytes(raw: bytes | memoryview, where: str, count: int | None = None) -> list[bytes]:
    """The elements of a raw BYTES tensor, `count` of them when given (a tensor that holds more or
    fewer is refused before the rest is read)."""
    view, items, offset = memoryview(raw), [], 0
    while offset < len(view):
        if count is not None and len(items) == count:
            raise bad(where, f"holds more than the {count} BYTES elements its shape declares")
        if offset + 4 > len(view):
            raise bad(where, "a BYTES element's 4-byte length is cut short")
        (length,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if offset + length > len(view):
            raise bad(where, "a BYTES element runs past the end of its tensor")
        items.append(bytes(view[offset:offset + length]))
        offset += length
    if count is not None and len(items) != count:
        raise bad(where, f"holds {len(items)} BYTES elements, its shape declares {count}")
    return items


def _bf16_from_floats(values: np.ndarray) -> bytes:
    """float32 -> bfloat16 with round-to-nearest-even, the top 16 bits of each float."""
    bits = values.astype("<f4").view("<u4").astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype("<u2").tobytes()


def _floats_from_bf16(raw: bytes) -> np.ndarray:
    return (np.frombuffer(raw, "<u2").astype("<u4") << 16).view("<f4")


def element_size(datatype: str) -> int | None:
    """Bytes per element; None for BYTES (variable)."""
    if datatype == "BF16":
        return 2
    return None if datatype == "BYTES" else np.dtype(_NUMPY[datatype]).itemsize


# ---- requests ----

def _json_header(body: bytes, header_length: str | None, max_header: int) -> tuple[dict, int]:
    """The JSON part of an infer body and where the binary tensors start."""
    if header_length is None:
        size = len(body)
        if size > max_header:
            raise KServeError(413, f"the JSON request is over {max_header} bytes; send the tensors binary "
                                   f"({HEADER_LENGTH} and parameters.binary_data_size)")
    else:
        text = header_length.strip()
        if not text.isdigit() or not text.isascii():
            raise bad(HEADER_LENGTH, f"must be a byte count, got {header_length!r}")
        size = int(text)
        if size > max_header:
            raise KServeError(413, f"{HEADER_LENGTH}: the JSON header may be at most {max_header} bytes, "
                                   f"got {size}")
        if size > len(body):
            raise bad(HEADER_LENGTH, f"{size} is more than the {len(body)} bytes of the body")
    try:
        parsed = json.loads(bytes(body[:size]))
    except (ValueError, RecursionError):
        raise KServeError(400, "the request is not valid JSON") from None
    if not isinstance(parsed, dict):
        raise KServeError(400, "the request must be a JSON object")
    return parsed, size


def _object(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad(where, "must be an object")
    return value


def _list(value, where: str) -> list:
    if not isinstance(value, list):
        raise bad(where, "must be a list")
    return value


def _string(value, where: str, required: bool = True) -> str:
    if not isinstance(value, str) or (required and not value):
        raise bad(where, "must be a non-empty string" if required else "must be a string")
    return value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parameter(value, where: str) -> kpb.InferParameter:
    """A JSON parameter value as the gRPC InferParameter of its type."""
    if isinstance(value, bool):
        return kpb.InferParameter(bool_param=value)
    if _is_int(value):
        if -(1 << 63) <= value < (1 << 63):
            return kpb.InferParameter(int64_param=value)
        if 0 <= value < (1 << 64):
            return kpb.InferParameter(uint64_param=value)
        raise bad(where, "is out of the 64-bit range")
    if isinstance(value, float):
        return kpb.InferParameter(double_param=value)
    if isinstance(value, str):
        return kpb.InferParameter(string_param=value)
    raise bad(where, f"must be a bool, number or string, got {type(value).__name__}")


def parameters_json(parameters) -> dict:
    """A gRPC parameter map back to JSON values."""
    return {key: getattr(p, p.WhichOneof("parameter_choice")) for key, p in sorted(parameters.items())
            if p.WhichOneof("parameter_choice")}


def _shape(value, where: str, limit: int) -> tuple[list[int], int]:
    """The dimensions and their element count; a count past `limit` is refused before it is used."""
    dims = _list(value, where)
    if len(dims) > MAX_DIMS:
        raise bad(where, f"has more than {MAX_DIMS} dimensions")
    count = 1
    for dim in dims:
        if not _is_int(dim) or dim < 0:
            raise bad(where, f"dimensions must be non-negative integers, got {dim!r}")
        count *= dim
        if count > limit:
            raise KServeError(413, f"{where}: {dims} is more elements than a request may hold")
    return dims, count


def _flatten(data, where: str, limit: int) -> list:
    """Row-major elements of JSON `data` (flat, or nested as the shape), at most `limit` of them."""
    out: list = []
    stack = [(data, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, list):
            if depth >= MAX_DIMS:
                raise bad(where, f"nests deeper than {MAX_DIMS} lists")
            stack.extend((child, depth + 1) for child in reversed(item))
        else:
            out.append(item)
            if len(out) > limit:
                raise bad(where, f"holds more than the {limit} elements of its shape")
    return out


def _json_tensor(values: list, datatype: str, where: str) -> bytes:
    """JSON elements as the raw little-endian tensor of `datatype`, each element checked for its type."""
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in values):
            raise bad(where, "BYTES elements must be strings")
        return encode_bytes([v.encode("utf-8") for v in values])
    if datatype == "BOOL":
        if not all(isinstance(v, bool) for v in values):
            raise bad(where, "BOOL elements must be true or false")
        return np.array(values, "?").tobytes()
    if datatype.startswith(("INT", "UINT")):
        if not all(_is_int(v) for v in values):
            raise bad(where, f"{datatype} elements must be integers")
        info = np.iinfo(_NUMPY[datatype])
        if values and not (info.min <= min(values) and max(values) <= info.max):
            raise bad(where, f"an element is out of the range of {datatype}")
        return np.array(values, _NUMPY[datatype]).tobytes()
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise bad(where, f"{datatype} elements must be numbers")
    try:
        floats = np.array(values, "<f8")
    except OverflowError:
        raise bad(where, f"an element is out of the range of {datatype}") from None
    if datatype == "BF16":
        return _bf16_from_floats(floats)
    with np.errstate(over="ignore"):
        converted = floats.astype(_NUMPY[datatype])
    if not np.all(np.isfinite(converted) == np.isfinite(floats)):
        raise bad(where, f"an element is out of the range of {datatype}")
    return converted.tobytes()


def _check_raw(raw: memoryview, datatype: str, count: int, where: str) -> None:
    size = element_size(datatype)
    if size is None:
        decode_bytes(raw, where, count)
    elif len(raw) != count * size:
        raise bad(where, f"{len(raw)} bytes do not hold the {count} {datatype} elements of its shape "
                         f"({count * size} bytes)")


_REQUEST_KEYS = frozenset({"id", "parameters", "inputs", "outputs"})


def parse_infer(body: bytes, header_length: str | None, model: str, version: str = "",
                max_header: int = MAX_HEADER_BYTES) -> InferCall:
    """An infer request's body (JSON, or a JSON header and binary tensors) as the gRPC request."""
    header, offset = _json_header(body, header_length, max_header)
    unknown = sorted(set(header) - _REQUEST_KEYS)
    if unknown:
        raise bad(unknown[0], "is not a field of an infer request (id, parameters, inputs, outputs)")
    request = kpb.ModelInferRequest(model_name=model, model_version=version,
                                    id=_string(header.get("id", ""), "id", required=False))
    call = InferCall(request)
    for key, value in _object(header.get("parameters"), "parameters").items():
        if key == "binary_data_output":
            if not isinstance(value, bool):
                raise bad("parameters.binary_data_output", "must be true or false")
            call.binary_default = value
        else:
            request.parameters[key].CopyFrom(parameter(value, f"parameters.{key}"))
    inputs = _list(header.get("inputs"), "inputs")
    if not inputs:
        raise bad("inputs", "must hold at least one input")
    view = memoryview(body)
    for index, tensor in enumerate(inputs):
        where = f"inputs[{index}]"
        tensor = _object(tensor, where)
        extra = sorted(set(tensor) - {"name", "datatype", "shape", "parameters", "data"})
        if extra:
            raise bad(f"{where}.{extra[0]}", "is not a field of an input (name, datatype, shape, parameters, data)")
        name = _string(tensor.get("name"), f"{where}.name")
        datatype = tensor.get("datatype")
        if datatype not in DATATYPES:
            raise bad(f"{where}.datatype", f"unknown datatype {datatype!r}; one of {', '.join(DATATYPES)}")
        # No tensor can hold more elements than the body has bytes (BYTES elements take at least 4).
        dims, count = _shape(tensor.get("shape"), f"{where}.shape", len(body))
        grpc_input = request.inputs.add(name=name, datatype=datatype, shape=dims)
        params = _object(tensor.get("parameters"), f"{where}.parameters")
        size = params.get("binary_data_size")
        for key, value in params.items():
            if key != "binary_data_size":
                grpc_input.parameters[key].CopyFrom(parameter(value, f"{where}.parameters.{key}"))
        if size is not None:
            if "data" in tensor:
                raise bad(f"{where}.data", "an input with parameters.binary_data_size has no data")
            if not _is_int(size) or size < 0:
                raise bad(f"{where}.parameters.binary_data_size", "must be a non-negative integer")
            if header_length is None:
                raise bad(f"{where}.parameters.binary_data_size", f"binary data needs the {HEADER_LENGTH} header")
            if offset + size > len(body):
                raise bad(f"{where}.parameters.binary_data_size",
                          f"{size} bytes run past the end of the body ({len(body) - offset} left)")
            raw = view[offset:offset + size]
            offset += size
            _check_raw(raw, datatype, count, f"{where}.parameters.binary_data_size")
            request.raw_input_contents.append(bytes(raw))
            continue
        if "data" not in tensor:
            raise bad(f"{where}.data", "is missing (or give parameters.binary_data_size and binary data)")
        values = _flatten(_list(tensor["data"], f"{where}.data"), f"{where}.data", count)
        if len(values) != count:
            raise bad(f"{where}.data", f"holds {len(values)} elements, its shape {dims} declares {count}")
        request.raw_input_contents.append(_json_tensor(values, datatype, f"{where}.data"))
    if offset != len(body):
        raise bad(HEADER_LENGTH, f"{len(body) - offset} bytes follow the last binary input")
    for index, output in enumerate(_list(header.get("outputs", []), "outputs")):
        where = f"outputs[{index}]"
        output = _object(output, where)
        name = _string(output.get("name"), f"{where}.name")
        wanted = request.outputs.add(name=name)
        for key, value in _object(output.get("parameters"), f"{where}.parameters").items():
            if key == "binary_data":
                if not isinstance(value, bool):
                    raise bad(f"{where}.parameters.binary_data", "must be true or false")
                call.binary_outputs[name] = value
            elif key == "classification":
                raise bad(f"{where}.parameters.classification", "is not supported by this server")
            else:
                wanted.parameters[key].CopyFrom(parameter(value, f"{where}.parameters.{key}"))
    return call


# ---- responses ----

_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
             "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
             "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
             "FP64": "fp64_contents", "BYTES": "bytes_contents"}


def _raw_output(reply: kpb.ModelInferResponse, index: int) -> bytes:
    """Output `index` as raw bytes, from `raw_output_contents` or else its typed contents."""
    if reply.raw_output_contents:
        return reply.raw_output_contents[index]
    tensor = reply.outputs[index]
    kind = _CONTENTS.get(tensor.datatype)
    if kind is None:
        raise KServeError(502, f"output {tensor.name!r}: the inference service sent {tensor.datatype} "
                               f"without raw contents")
    values = list(getattr(tensor.contents, kind))
    if tensor.datatype == "BYTES":
        return encode_bytes(values)
    return np.array(values, _NUMPY[tensor.datatype]).tobytes()


def _json_values(raw: bytes, datatype: str, count: int, name: str) -> list:
    where = f"output {name!r}"
    if datatype == "BYTES":
        try:
            return [item.decode("utf-8") for item in decode_bytes(raw, where, count)]
        except UnicodeDecodeError:
            raise KServeError(400, f"{where} is not UTF-8 text; ask for it with parameters.binary_data") from None
    size = element_size(datatype)
    if size is None or len(raw) != count * size:
        raise KServeError(502, f"{where}: the inference service sent {len(raw)} bytes for {count} "
                               f"{datatype} elements")
    values = _floats_from_bf16(raw) if datatype == "BF16" else np.frombuffer(raw, _NUMPY[datatype])
    out = values.tolist()
    if datatype.startswith(("FP", "BF")) and not all(math.isfinite(v) for v in out):
        # JSON has no NaN or infinity.
        raise KServeError(400, f"{where} holds NaN or infinity, which JSON cannot carry; ask for it binary")
    return out


def render_infer(reply: kpb.ModelInferResponse, call: InferCall) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the length of its JSON header."""
    if reply.raw_output_contents and len(reply.raw_output_contents) != len(reply.outputs):
        raise KServeError(502, "the inference service sent raw contents that do not match its outputs")
    outputs, tail = [], []
    for index, tensor in enumerate(reply.outputs):
        raw = _raw_output(reply, index)
        entry: dict = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        params = parameters_json(tensor.parameters)
        if call.binary(tensor.name):
            params["binary_data_size"] = len(raw)
            tail.append(raw)
        else:
            entry["data"] = _json_values(raw, tensor.datatype, math.prod(tensor.shape), tensor.name)
        if params:
            entry["parameters"] = params
        outputs.append(entry)
    header: dict = {"model_name": reply.model_name, "model_version": reply.model_version}
    if reply.id:
        header["id"] = reply.id
    if reply.parameters:
        header["parameters"] = parameters_json(reply.parameters)
    header["outputs"] = outputs
    text = json.dumps(header, separators=(",", ":")).encode()
    if not tail:
        return text, None
    return text + b"".join(tail), len(text)


def tensor_metadata(tensors) -> list[dict]:
    return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in tensors]


def model_metadata(reply: kpb.ModelMetadataResponse) -> dict:
    return {"name": reply.name, "versions": list(reply.versions), "platform": reply.platform,
            "inputs": tensor_metadata(reply.inputs), "outputs": tensor_metadata(reply.outputs)}


def model_config(reply: kpb.ModelMetadataResponse) -> dict:
    """Triton's model-config JSON as far as the metadata tells it (no batching dimension: shapes are whole)."""
    def tensors(items):
        return [{"name": t.name, "data_type": CONFIG_TYPES.get(t.datatype, t.datatype), "dims": list(t.shape)}
                for t in items]
    return {"name": reply.name, "platform": reply.platform, "backend": "fastserve", "max_batch_size": 0,
            "input": tensors(reply.inputs), "output": tensors(reply.outputs)}


def repository_parameter(value, where: str) -> kpb.ModelRepositoryParameter:
    if isinstance(value, bool):
        return kpb.ModelRepositoryParameter(bool_param=value)
    if _is_int(value) and -(1 << 63) <= value < (1 << 63):
        return kpb.ModelRepositoryParameter(int64_param=value)
    if isinstance(value, str):
        return kpb.ModelRepositoryParameter(string_param=value)
    raise bad(where, "must be a bool, an integer or a string")


def json_object(body: bytes, max_size: int = MAX_HEADER_BYTES) -> dict:
    """A small JSON request body (repository calls); an empty body is `{}`."""
    if not body.strip():
        return {}
    return _json_header(body, None, max_size)[0]
