"""KServe v2 over REST on the gateway's port: Triton's HTTP client against it gives what the inference
service's gRPC calls give; the binary tensor extension; KServe's `{"error": ...}` with the gRPC code's
status; the bearer token. Then the pure translation of `kserve_codec`."""

from __future__ import annotations

import gzip
import json
import socket
import struct
import zlib

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from fastserve.client import sampling_params
from fastserve.kserve.v2 import grpc_service_pb2 as kpb
from fastserve.services.gateway import kserve_codec as codec
from fastserve.services.gateway.kserve_codec import KServeError
from fastserve.services.gateway.kserve_rest import decompress
from tests.gateway.conftest import CHAT, EMBED, TOKEN

TEXTS = ["the cat sat on the mat", "gRPC and REST, one server", "ünïcödé is fine"]
PROMPTS = ["def main(", "import os\n"]


@pytest.fixture(scope="module")
def client(gateway):
    with triton.InferenceServerClient(f"127.0.0.1:{gateway.port}", network_timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def v2(gateway) -> str:
    return f"http://127.0.0.1:{gateway.port}/v2"


def text_input(name: str, texts: list[str], binary: bool) -> triton.InferInput:
    tensor = triton.InferInput(name, [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object), binary_data=binary)
    return tensor


def test_health_metadata_and_config(client):
    assert client.is_server_live() and client.is_server_ready()
    server = client.get_server_metadata()
    assert server["name"] == "fastserve" and "model_repository" in server["extensions"]
    assert client.is_model_ready(EMBED) and client.is_model_ready(CHAT)
    assert not client.is_model_ready("no-such-model")
    meta = client.get_model_metadata(EMBED)
    assert meta["name"] == EMBED and meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert meta["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}]
    assert client.get_model_metadata(EMBED, model_version=meta["versions"][0])["name"] == EMBED
    assert client.is_model_ready(EMBED, model_version=meta["versions"][0])
    config = client.get_model_config(CHAT)
    assert config["input"] == [{"name": "text_input", "data_type": "TYPE_STRING", "dims": [-1]}]
    index = client.get_model_repository_index()
    assert {(m["name"], m["state"]) for m in index} >= {(EMBED, "READY"), (CHAT, "READY")}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_embeddings_equal_grpc_embed(client, grpc_client, binary):
    direct = np.array([e.values for e in grpc_client.embed(EMBED, TEXTS).embeddings], dtype=np.float32)
    wanted = [triton.InferRequestedOutput("embedding", binary_data=binary)]
    result = client.infer(EMBED, [text_input("text", TEXTS, binary)], outputs=wanted, request_id="r-1")
    vectors = result.as_numpy("embedding")
    assert vectors.dtype == np.float32 and vectors.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(vectors, direct, atol=1e-5)
    output = result.get_output("embedding")
    assert ("data" in output) is not binary and result.get_response()["id"] == "r-1"
    # No outputs named: tritonclient asks for all of them binary (binary_data_output).
    compressed = client.infer(EMBED, [text_input("text", TEXTS, binary)], request_compression_algorithm="gzip")
    np.testing.assert_allclose(compressed.as_numpy("embedding"), direct, atol=1e-5)


def test_raw_json_and_binary_bodies(v2, grpc_client):
    direct = np.float32(grpc_client.embed(EMBED, TEXTS[:1]).embeddings[0].values)
    plain = httpx.post(f"{v2}/models/{EMBED}/infer", timeout=60,
                       json={"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1, 1], "data": [[TEXTS[0]]]}]})
    assert plain.status_code == 200 and plain.headers["content-type"] == "application/json"
    [out] = plain.json()["outputs"]
    assert out["shape"] == [1, 384] and np.allclose(out["data"], direct, atol=1e-5)
    element = TEXTS[0].encode()
    header = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": 4 + len(element)}}],
                         "parameters": {"binary_data_output": True}}).encode()
    reply = httpx.post(f"{v2}/models/{EMBED}/infer", content=header + struct.pack("<I", len(element)) + element,
                       headers={"Inference-Header-Content-Length": str(len(header))}, timeout=60)
    assert reply.status_code == 200 and reply.headers["content-type"] == "application/octet-stream"
    size = int(reply.headers["inference-header-content-length"])
    [out] = json.loads(reply.content[:size])["outputs"]
    assert out["parameters"] == {"binary_data_size": 384 * 4}
    assert np.allclose(np.frombuffer(reply.content[size:], "<f4"), direct, atol=1e-5)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_generation_equals_grpc_generate(client, grpc_client, binary):
    direct = [grpc_client.generate(CHAT, p, sampling_params(max_new_tokens=6)).text for p in PROMPTS]
    wanted = [triton.InferRequestedOutput("text_output", binary_data=binary)]
    result = client.infer(CHAT, [text_input("text_input", PROMPTS, binary)], outputs=wanted,
                          parameters={"max_tokens": 6, "temperature": 0.0})
    # tritonclient gives binary BYTES as bytes, JSON ones as the strings JSON carried.
    texts = [t.decode() if binary else t for t in result.as_numpy("text_output")]
    assert texts == direct and any(texts)


def _kserve_error(body: dict) -> str:
    """The message of KServe's `{"error": "<message>"}` (a string, not OpenAI's object)."""
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    return body["error"]


def _refusal(excinfo) -> tuple[str, str]:
    return excinfo.value.status(), excinfo.value.message()


def test_unknown_model_is_404(client, v2):
    for call in (lambda: client.get_model_metadata("no-such-model"),
                 lambda: client.infer("no-such-model", [text_input("text", ["x"], True)])):
        with pytest.raises(InferenceServerException) as excinfo:
            call()
        status, message = _refusal(excinfo)
        assert status == "404" and "no-such-model" in message
    reply = httpx.get(f"{v2}/no/such/route")
    assert reply.status_code == 404 and _kserve_error(reply.json())


def _post(v2: str, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(f"{v2}/models/{EMBED}/infer", content=json.dumps(body).encode(), timeout=60, **kwargs)


@pytest.mark.parametrize(("tensor", "field"), [
    ({"name": "text", "datatype": "STRING", "shape": [1], "data": ["x"]}, "inputs[0].datatype"),
    ({"name": "text", "datatype": "BYTES", "shape": [2], "data": ["x"]}, "inputs[0].data"),
    ({"name": "text", "datatype": "BYTES", "shape": [1], "data": [3]}, "inputs[0].data"),
    ({"name": "text", "datatype": "BYTES", "shape": [-1], "data": ["x"]}, "inputs[0].shape"),
    ({"name": "text", "datatype": "FP32", "shape": [1], "data": [1.5]}, "inputs[0].datatype"),  # the servicer's
    ({"name": "other", "datatype": "BYTES", "shape": [1], "data": ["x"]}, "inputs"),  # the servicer's
])
def test_bad_tensors_are_400_naming_the_field(v2, tensor, field):
    reply = _post(v2, {"inputs": [tensor]})
    assert reply.status_code == 400, reply.text
    assert _kserve_error(reply.json()).startswith(f"{field}:")


def test_bad_datatype_through_tritonclient(client):
    tensor = triton.InferInput("text", [1], "FP32")
    tensor.set_data_from_numpy(np.float32([1.0]))
    with pytest.raises(InferenceServerException) as excinfo:
        client.infer(EMBED, [tensor])
    status, message = _refusal(excinfo)
    assert status == "400" and message.startswith("inputs[0].datatype:") and "BYTES" in message


def test_binary_sizes_are_checked(v2):
    header = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": 10}}]}).encode()
    raw = struct.pack("<I", 5) + b"hello"
    too_long = {"Inference-Header-Content-Length": str(10**9)}
    reply = httpx.post(f"{v2}/models/{EMBED}/infer", content=header + raw, headers=too_long)
    assert reply.status_code == 413 and "Inference-Header-Content-Length" in reply.json()["error"]
    past_body = {"Inference-Header-Content-Length": str(len(header) + len(raw) + 1)}
    reply = httpx.post(f"{v2}/models/{EMBED}/infer", content=header + raw, headers=past_body)
    assert reply.status_code == 400 and reply.json()["error"].startswith("Inference-Header-Content-Length:")
    exact = {"Inference-Header-Content-Length": str(len(header))}
    reply = httpx.post(f"{v2}/models/{EMBED}/infer", content=header + raw, headers=exact)
    assert reply.status_code == 400 and reply.json()["error"].startswith("inputs[0].parameters.binary_data_size:")
    assert "10 bytes run past the end of the body (9 left)" in reply.json()["error"]
    # A declared body over the cap is refused from its headers, before any of it is sent, in KServe's shape.
    port = int(v2.rsplit(":", 1)[1].split("/")[0])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"POST /v2/models/{EMBED}/infer HTTP/1.1\r\nhost: x\r\n"
                     f"content-length: {codec.MAX_BODY_BYTES + 1}\r\n\r\n".encode())
        answer = b""
        while b"}" not in answer:
            chunk = sock.recv(4096)
            assert chunk, answer
            answer += chunk
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and "over" in _kserve_error(json.loads(payload))


def test_auth_applies_to_v2(secured_gateway):
    url = f"127.0.0.1:{secured_gateway.port}"
    with triton.InferenceServerClient(url) as anonymous:
        assert not anonymous.is_server_live()
        with pytest.raises(InferenceServerException) as excinfo:
            anonymous.get_model_metadata(EMBED)
        status, message = _refusal(excinfo)
        assert status == "401" and "bearer token" in message
        with pytest.raises(InferenceServerException) as excinfo:
            anonymous.get_model_metadata(EMBED, headers={"Authorization": f"Bearer {TOKEN}x"})
        assert _refusal(excinfo)[0] == "401"
        headers = {"Authorization": f"Bearer {TOKEN}"}
        assert anonymous.is_server_live(headers=headers) and anonymous.is_model_ready(EMBED, headers=headers)
        result = anonymous.infer(EMBED, [text_input("text", TEXTS[:1], True)], headers=headers)
        assert result.as_numpy("embedding").shape == (1, 384)


# ---- the pure translation ----

def test_bytes_round_trip_and_truncation():
    items = [b"", b"a", "ünï".encode(), bytes(range(256))]
    raw = codec.encode_bytes(items)
    assert codec.decode_bytes(raw, "t") == items and codec.decode_bytes(raw, "t", 4) == items
    for broken, words in ((raw[:-1], "runs past"), (raw + b"\x01", "cut short")):
        with pytest.raises(KServeError, match=words):
            codec.decode_bytes(broken, "t")
    with pytest.raises(KServeError, match="more than the 3"):
        codec.decode_bytes(raw, "t", 3)
    with pytest.raises(KServeError, match="holds 4 BYTES elements, its shape declares 5"):
        codec.decode_bytes(raw, "t", 5)


def _binary_request(tensors: list[tuple[dict, bytes]], **top) -> tuple[bytes, str]:
    header = json.dumps({"inputs": [t for t, _ in tensors], **top}).encode()
    return header + b"".join(raw for _, raw in tensors), str(len(header))


def test_binary_request_decodes_to_raw_contents():
    vectors = np.arange(6, dtype="<f4").reshape(2, 3)
    words = codec.encode_bytes([b"x", b"yz"])
    body, length = _binary_request(
        [({"name": "v", "datatype": "FP32", "shape": [2, 3], "parameters": {"binary_data_size": 24}},
          vectors.tobytes()),
         ({"name": "w", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(words)}}, words)],
        parameters={"binary_data_output": True, "max_tokens": 4, "temperature": 0.5, "stop": "x", "big": 2**63})
    call = codec.parse_infer(body, length, "m", "2")
    request = call.request
    assert (request.model_name, request.model_version) == ("m", "2")
    assert [(t.name, t.datatype, list(t.shape)) for t in request.inputs] == [("v", "FP32", [2, 3]), ("w", "BYTES", [2])]
    assert list(request.raw_input_contents) == [vectors.tobytes(), words]
    assert codec.parameters_json(request.parameters) == {"max_tokens": 4, "temperature": 0.5, "stop": "x",
                                                         "big": 2**63}
    assert call.binary("anything") and "binary_data_output" not in request.parameters


def test_json_data_is_converted_and_checked():
    body = json.dumps({"inputs": [
        {"name": "a", "datatype": "INT8", "shape": [2, 2], "data": [[1, -2], [3, 4]]},
        {"name": "b", "datatype": "BOOL", "shape": [2], "data": [True, False]},
        {"name": "c", "datatype": "BF16", "shape": [2], "data": [1.0, -2.5]},
        {"name": "d", "datatype": "FP16", "shape": [1], "data": [0.5]}],
        "outputs": [{"name": "o", "parameters": {"binary_data": False}}]}).encode()
    call = codec.parse_infer(body, None, "m")
    raw = list(call.request.raw_input_contents)
    assert raw[0] == np.int8([1, -2, 3, 4]).tobytes() and raw[1] == b"\x01\x00"
    assert np.array_equal(codec._floats_from_bf16(raw[2]), np.float32([1.0, -2.5]))
    assert raw[3] == np.float16([0.5]).astype("<f2").tobytes()
    assert not call.binary("o") and [o.name for o in call.request.outputs] == ["o"]
    for tensor, field in (({"name": "a", "datatype": "INT8", "shape": [1], "data": [300]}, "inputs[0].data"),
                          ({"name": "a", "datatype": "FP16", "shape": [1], "data": [1e6]}, "inputs[0].data"),
                          ({"name": "a", "datatype": "INT32", "shape": [1], "data": [1.5]}, "inputs[0].data"),
                          ({"name": "a", "datatype": "FP32", "shape": [1], "data": [[[1.0]]], "x": 1}, "inputs[0].x"),
                          ({"name": "", "datatype": "FP32", "shape": [1], "data": [1.0]}, "inputs[0].name"),
                          ({"name": "a", "datatype": "FP32", "shape": [1.0], "data": [1.0]}, "inputs[0].shape"),
                          ({"name": "a", "datatype": "FP32", "shape": [1], "data": 1.0}, "inputs[0].data")):
        with pytest.raises(KServeError) as excinfo:
            codec.parse_infer(json.dumps({"inputs": [tensor]}).encode(), None, "m")
        assert excinfo.value.status == 400 and excinfo.value.message.startswith(f"{field}:")


def test_bounds_before_allocation():
    big = json.dumps({"inputs": [{"name": "t", "datatype": "BYTES", "shape": [1], "data": ["x" * 200]}]}).encode()
    with pytest.raises(KServeError) as excinfo:
        codec.parse_infer(big, None, "m", max_header=100)
    assert excinfo.value.status == 413
    # A shape of more elements than the body has bytes is refused from the shape alone.
    huge = json.dumps({"inputs": [{"name": "t", "datatype": "FP32", "shape": [1 << 20, 1 << 20],
                                   "parameters": {"binary_data_size": 4}}]}).encode()
    with pytest.raises(KServeError) as excinfo:
        codec.parse_infer(huge + b"\0" * 4, str(len(huge)), "m")
    assert excinfo.value.status == 413 and excinfo.value.message.startswith("inputs[0].shape:")
    body, length = _binary_request([({"name": "t", "datatype": "FP32", "shape": [2],
                                      "parameters": {"binary_data_size": 8}}, b"\0" * 4)])
    with pytest.raises(KServeError, match="run past the end of the body"):
        codec.parse_infer(body, length, "m")
    body, length = _binary_request([({"name": "t", "datatype": "FP32", "shape": [2],
                                      "parameters": {"binary_data_size": 4}}, b"\0" * 8)])
    with pytest.raises(KServeError, match="4 bytes do not hold the 2 FP32 elements"):
        codec.parse_infer(body, length, "m")
    body, length = _binary_request([({"name": "t", "datatype": "FP32", "shape": [2],
                                      "parameters": {"binary_data_size": 8}}, b"\0" * 9)])
    with pytest.raises(KServeError, match="1 bytes follow the last binary input"):
        codec.parse_infer(body, length, "m")
    for header_length in ("-1", "1e3", "x"):
        with pytest.raises(KServeError, match="must be a byte count"):
            codec.parse_infer(body, header_length, "m")


def test_render_binary_and_json_outputs():
    out = kpb.ModelInferResponse.InferOutputTensor
    vectors = np.float32([[1.5, -2.0]])
    words = codec.encode_bytes([b"hi", "ü".encode()])
    reply = kpb.ModelInferResponse(model_name="m", model_version="1", id="x",
                                   outputs=[out(name="v", datatype="FP32", shape=[1, 2]),
                                            out(name="w", datatype="BYTES", shape=[2])],
                                   raw_output_contents=[vectors.tobytes(), words])
    call = codec.InferCall(kpb.ModelInferRequest(), binary_outputs={"w": True})
    body, size = codec.render_infer(reply, call)
    header = json.loads(body[:size])
    assert header["id"] == "x" and header["outputs"][0]["data"] == [1.5, -2.0]
    assert header["outputs"][1]["parameters"] == {"binary_data_size": len(words)} and body[size:] == words
    as_json, none = codec.render_infer(reply, codec.InferCall(kpb.ModelInferRequest()))
    assert none is None and json.loads(as_json)["outputs"][1]["data"] == ["hi", "ü"]
    # Typed contents (as another KServe server sends them) render the same.
    typed = kpb.ModelInferResponse(outputs=[out(name="v", datatype="FP32", shape=[1, 2],
                                                contents=kpb.InferTensorContents(fp32_contents=[1.5, -2.0]))])
    assert json.loads(codec.render_infer(typed, call)[0])["outputs"][0]["data"] == [1.5, -2.0]


def test_compressed_bodies_are_inflated_within_the_bound():
    body = b'{"inputs": []}'
    assert decompress(gzip.compress(body), "gzip") == body and decompress(zlib.compress(body), "deflate") == body
    assert decompress(body, None) == body
    bomb = gzip.compress(b"\0" * (2 << 20))
    assert len(bomb) < 4096
    with pytest.raises(KServeError) as excinfo:
        decompress(bomb, "gzip", limit=1 << 20)
    assert excinfo.value.status == 413
    for data, encoding, status in ((body, "gzip", 400), (body, "br", 415)):
        with pytest.raises(KServeError) as excinfo:
            decompress(data, encoding)
        assert excinfo.value.status == status


def test_grpc_codes_map_to_kserve_statuses():
    assert [codec.http_status(c) for c in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                                           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE,
                                           grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL)] == \
        [400, 404, 429, 503, 504, 500]
