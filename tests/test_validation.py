"""Every request is checked by its descriptor before a servicer sees it: unknown enum values, non-finite
numbers, over-long strings, over-deep Structs, and bytes that are no request at all. The walk alone, then
through a real server built by `create_server` with proto-typed methods."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import struct_pb2

from fastserve.inference.v1 import inference_pb2 as ipb
from fastserve.kserve.v2 import grpc_service_pb2 as kpb
from fastserve.optimization.v1 import optimization_pb2 as opb
from fastserve.preprocessing.v1 import preprocessing_pb2 as ppb
from fastserve.runtime.errors import InvalidArgument
from fastserve.runtime.server import create_server
from fastserve.runtime.validation import MAX_STRING_BYTES, MAX_STRUCT_DEPTH, check_request
from tests.support.rpc import field_of


def _refused(message) -> str:
    with pytest.raises(InvalidArgument) as info:
        check_request(message)
    return field_of(info.value)


def _nested(depth: int) -> struct_pb2.Struct:
    inner = struct_pb2.Struct()
    for _ in range(depth - 1):
        outer = struct_pb2.Struct()
        outer.fields["a"].struct_value.CopyFrom(inner)
        inner = outer
    return inner


def test_unknown_enum_values_name_their_path():
    steps = [opb.OptimizationStep(prune=opb.PruneStep(method=1, sparsity=0.5)),
             opb.OptimizationStep(quantize=opb.QuantizeStep(method=99))]
    assert _refused(opb.SubmitOptimizationJobRequest(steps=steps)) == "steps[1].quantize.method"
    assert _refused(ipb.LoadModelRequest(name="m", config=ipb.ModelConfig(backend=-3))) == "config.backend"
    check_request(opb.SubmitOptimizationJobRequest(steps=steps[:1]))  # defined values pass


def test_non_finite_numbers_anywhere():
    assert _refused(opb.PruneStep(method=1, sparsity=float("nan"))) == "sparsity"
    options = struct_pb2.Struct()
    options.update({"min_chars": 1, "nested": {"threshold": float("inf")}})
    assert _refused(ppb.CleanTextRequest(steps=[ppb.CleanStep(name="x", options=options)])) == \
        "steps[0].options.nested.threshold"
    kserve = kpb.ModelInferRequest(model_name="m")
    kserve.parameters["temperature"].double_param = float("nan")
    assert _refused(kserve) == "parameters.temperature.double_param"
    tensor = kpb.ModelInferRequest.InferInputTensor(name="x", contents=kpb.InferTensorContents(
        fp32_contents=[1.0, 2.0, float("-inf")]))
    assert _refused(kpb.ModelInferRequest(inputs=[tensor])) == "inputs[0].contents.fp32_contents[2]"


def test_struct_depth_and_string_length_are_bounded():
    check_request(ppb.CleanStep(name="x", options=_nested(MAX_STRUCT_DEPTH)))
    assert _refused(ppb.CleanStep(name="x", options=_nested(MAX_STRUCT_DEPTH + 1))).startswith("options.a.a")
    listed = struct_pb2.Struct()
    listed.update({"keep": [["a"] * 2]})
    check_request(ppb.CleanStep(options=listed))
    check_request(ppb.CleanTextRequest(texts=["é" * (MAX_STRING_BYTES // 2)]))  # exactly the bound, in bytes
    assert _refused(ppb.CleanTextRequest(texts=["ok", "é" * (MAX_STRING_BYTES // 2 + 1)])) == "texts[1]"
    # Bytes fields carry the big payloads and are bounded by the message size only.
    check_request(ppb.UploadCorpusRequest(chunk=b"x" * (2 * MAX_STRING_BYTES)))


SERVICE = "fastserve.test.v1.TypedProbe"


def _register(server: grpc.Server):
    def clean(request: ppb.CleanTextRequest, context) -> ppb.CleanTextResponse:
        return ppb.CleanTextResponse(texts=list(request.texts))

    def upload(requests, context) -> ppb.UploadCorpusResponse:
        return ppb.UploadCorpusResponse(bytes_received=sum(len(r.chunk) for r in requests))

    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "Clean": grpc.unary_unary_rpc_method_handler(
            clean, request_deserializer=ppb.CleanTextRequest.FromString,
            response_serializer=ppb.CleanTextResponse.SerializeToString),
        "Upload": grpc.stream_unary_rpc_method_handler(
            upload, request_deserializer=ppb.UploadCorpusRequest.FromString,
            response_serializer=ppb.UploadCorpusResponse.SerializeToString),
    }),))
    return [SERVICE]


@pytest.fixture(scope="module")
def channel(tmp_path_factory):
    from fastserve.runtime.config import Config

    config = Config.from_env({"FASTSERVE_HOME": str(tmp_path_factory.mktemp("home")), "FASTSERVE_REDIS_URL": "x"})
    running = create_server("preprocessing", _register, config, port=0)
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
        yield ch
    running.stop(0)


def _raw(channel, method: str, payload: bytes) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        channel.unary_unary(f"/{SERVICE}/{method}")(payload, timeout=5)
    return info.value


def test_server_checks_every_request(channel):
    good = ppb.CleanTextRequest(texts=["a"], steps=[ppb.CleanStep(name="lowercase")])
    clean = channel.unary_unary(f"/{SERVICE}/Clean", request_serializer=ppb.CleanTextRequest.SerializeToString,
                                response_deserializer=ppb.CleanTextResponse.FromString)
    assert clean(good, timeout=5).texts == ["a"]
    with pytest.raises(grpc.RpcError) as info:
        clean(ppb.CleanTextRequest(texts=["a", "b" * (MAX_STRING_BYTES + 1)]), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field_of(info.value) == "texts[1]"


def test_client_stream_is_checked_as_it_arrives(channel):
    upload = channel.stream_unary(f"/{SERVICE}/Upload", request_serializer=ppb.UploadCorpusRequest.SerializeToString,
                                  response_deserializer=ppb.UploadCorpusResponse.FromString)
    header = ppb.UploadCorpusRequest(header=ppb.UploadCorpusHeader(name="c", format=ppb.TEXT_FORMAT_PLAIN))
    assert upload(iter([header, ppb.UploadCorpusRequest(chunk=b"abc")]), timeout=5).bytes_received == 3
    bad = ppb.UploadCorpusRequest(header=ppb.UploadCorpusHeader(name="c", format=77))
    with pytest.raises(grpc.RpcError) as info:
        upload(iter([ppb.UploadCorpusRequest(chunk=b"abc"), bad]), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field_of(info.value) == "header.format"


@pytest.mark.parametrize("payload, problem", [
    (b"\x0a\x02\xff\xfe", "bad UTF-8"),  # texts[0] = two bytes that are no UTF-8
    (b"\x12\x05\x0a", "corrupt"),  # steps[0] announces 5 bytes, 1 follows
    (b"\x08\xff", "corrupt"),  # a varint that never ends
])
def test_undecodable_request_is_invalid_argument(channel, payload, problem):
    error = _raw(channel, "Clean", payload)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("the request is not a valid fastserve.preprocessing.v1.CleanTextRequest: ")
    assert problem in error.details()


def test_undecodable_message_in_a_stream(channel):
    upload = channel.stream_unary(f"/{SERVICE}/Upload")
    with pytest.raises(grpc.RpcError) as info:
        upload(iter([ppb.UploadCorpusRequest(chunk=b"abc").SerializeToString(), b"\x0a\x09\x0a"]), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "fastserve.preprocessing.v1.UploadCorpusRequest" in info.value.details()
