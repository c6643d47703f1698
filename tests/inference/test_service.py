"""The inference service end to end: a real server process with all-MiniLM-L6-v2, the FastServe API and
raw KServe v2 requests built here, under concurrency, version swaps, overload and bad input."""

from __future__ import annotations

import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from fastserve.inference.v1 import inference_pb2 as pb
from fastserve.kserve.v2 import grpc_service_pb2 as kpb
from fastserve.models.refs import BUILTIN_MODELS
from fastserve.storage.artifacts import ArtifactStore
from tests.support.processes import start_inference
from tests.support.rpc import field_of, raw_bytes
from tests.support.waiting import wait_until

MODEL = "all-MiniLM-L6-v2"
TEXTS = ["FastServe batches requests on the accelerator.", "hello world", "Ünïcödé text, too!",
         "The quick brown fox jumps over the lazy dog " * 3]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """An artifact store with two versions of MiniLM and a small topic classifier built on it."""
    from transformers import AutoModelForSequenceClassification

    root = tmp_path_factory.mktemp("inf") / "home"
    store = ArtifactStore(root / "artifacts")
    source = BUILTIN_MODELS[MODEL]()
    for _ in range(2):
        with store.publish("models", "minilm") as draft:
            for item in source.iterdir():
                if item.is_file():
                    shutil.copy(item, draft.path / item.name)
    from fastserve.services.optimization.export import export_encoder_onnx

    with store.publish("models", "minilm-onnx") as draft:
        export_encoder_onnx(source, draft.path)
    with store.publish("models", "topics") as draft:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(source), num_labels=3, id2label={0: "email", 1: "http", 2: "json"},
            label2id={"email": 0, "http": 1, "json": 2})
        model.save_pretrained(str(draft.path))
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            shutil.copy(source / name, draft.path / name)
    return root


@pytest.fixture(scope="module")
def server(home, tmp_path_factory):
    proc = start_inference(home, tmp_path_factory.mktemp("l") / "inf.log")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def reference():
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(BUILTIN_MODELS[MODEL]()), device="cpu")
    return model.encode(TEXTS, normalize_embeddings=True)


def text_request(model: str, texts: list[str], raw=True, **tensor) -> kpb.ModelInferRequest:
    items = [t.encode() for t in texts]
    spec = {"name": "text", "datatype": "BYTES", "shape": [len(items)], **tensor}
    if raw:
        return kpb.ModelInferRequest(model_name=model, inputs=[kpb.ModelInferRequest.InferInputTensor(**spec)],
                                     raw_input_contents=[raw_bytes(items)])
    return kpb.ModelInferRequest(model_name=model, inputs=[kpb.ModelInferRequest.InferInputTensor(
        **spec, contents=kpb.InferTensorContents(bytes_contents=items))])


def test_default_model_is_served_and_ready(kserve, stub):
    assert kserve.ServerLive(kpb.ServerLiveRequest()).live and kserve.ServerReady(kpb.ServerReadyRequest()).ready
    assert kserve.ModelReady(kpb.ModelReadyRequest(name=MODEL)).ready
    assert not kserve.ModelReady(kpb.ModelReadyRequest(name="nope")).ready
    meta = kserve.ModelMetadata(kpb.ModelMetadataRequest(name=MODEL))
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("text", "BYTES", [-1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("embedding", "FP32", [-1, 384])]
    status = stub.GetModelStatus(pb.GetModelStatusRequest(name=MODEL)).status
    assert status.state == pb.MODEL_STATE_READY and status.config.batching.max_batch_size == 32
    assert "model_repository" in kserve.ServerMetadata(kpb.ServerMetadataRequest()).extensions


@pytest.mark.parametrize("raw", [True, False])
def test_kserve_bytes_input_matches_the_reference(kserve, reference, raw):
    reply = kserve.ModelInfer(text_request(MODEL, TEXTS, raw=raw, shape=[len(TEXTS)]) if raw else
                              text_request(MODEL, TEXTS, raw=False))
    assert [(o.name, o.datatype, list(o.shape)) for o in reply.outputs] == [("embedding", "FP32", [4, 384])]
    got = np.frombuffer(reply.raw_output_contents[0], dtype="<f4").reshape(4, 384)
    assert np.abs(got - reference).max() < 1e-4


def test_embed_matches_the_reference(stub, reference):
    reply = stub.Embed(pb.EmbedRequest(model=MODEL, texts=TEXTS))
    got = np.array([e.values for e in reply.embeddings])
    assert reply.dimension == 384 and np.abs(got - reference).max() < 1e-4


def test_concurrent_requests_are_batched(stub):
    before = stub.GetModelStatistics(pb.GetModelStatisticsRequest(name=MODEL)).stats[0]
    with ThreadPoolExecutor(24) as pool:
        replies = list(pool.map(lambda i: stub.Embed(pb.EmbedRequest(model=MODEL, texts=[f"sentence {i}"])),
                                range(96)))
    assert len(replies) == 96
    after = stub.GetModelStatistics(pb.GetModelStatisticsRequest(name=MODEL)).stats[0]
    new_batches = {size: count - before.batch_sizes.get(size, 0) for size, count in after.batch_sizes.items()}
    assert max(size for size, count in new_batches.items() if count > 0) > 1
    assert after.request_count - before.request_count == 96 and after.inference_count - before.inference_count == 96
    assert after.batch_count - before.batch_count < 96


def test_classifier_over_both_protocols(stub, kserve):
    stub.LoadModel(pb.LoadModelRequest(name="topics"))
    reply = stub.Classify(pb.ClassifyRequest(model="topics", texts=["Send an e-mail", "GET / HTTP/1.1"], top_k=2))
    assert len(reply.results) == 2
    for result in reply.results:
        assert result.label == result.scores[0].label and len(result.scores) == 2
        assert result.scores[0].score >= result.scores[1].score
    k = kserve.ModelInfer(text_request("topics", ["Send an e-mail"]))
    names = [o.name for o in k.outputs]
    assert names == ["label", "scores"]
    scores = np.frombuffer(k.raw_output_contents[1], dtype="<f4")
    assert scores.shape == (3,) and abs(scores.sum() - 1) < 1e-5
    assert k.raw_output_contents[0][4:].decode() in {"email", "http", "json"}
    with pytest.raises(grpc.RpcError) as info:
        stub.Embed(pb.EmbedRequest(model="topics", texts=["x"]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field_of(info.value) == "model"
    for top_k in (-1, -100):  # -100: below minus the label count, once INTERNAL
        with pytest.raises(grpc.RpcError) as info:
            stub.Classify(pb.ClassifyRequest(model="topics", texts=["x"], top_k=top_k))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field_of(info.value) == "top_k"


def test_version_swap_under_load_loses_no_request(stub, kserve):
    stub.LoadModel(pb.LoadModelRequest(name="minilm", model_uri="artifact://models/minilm/1"))
    stop, failures, versions = threading.Event(), [], []

    def client():
        while not stop.is_set():
            try:
                versions.append(kserve.ModelInfer(text_request("minilm", ["swap me"]), timeout=30).model_version)
            except grpc.RpcError as exc:  # any failure fails the test
                failures.append(exc.code())

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    wait_until(lambda: len(versions) >= 16, "requests served by version 1", timeout=60)
    stub.LoadModel(pb.LoadModelRequest(name="minilm", model_uri="artifact://models/minilm/2"))
    swapped = len(versions)
    wait_until(lambda: versions[swapped:].count("2") >= 16, "requests served by version 2", timeout=60)
    stop.set()
    for t in threads:
        t.join()
    assert failures == []
    assert versions[0] == "1" and versions[-1] == "2" and set(versions) == {"1", "2"}
    assert [m.version for m in stub.ListModels(pb.ListModelsRequest()).models if m.name == "minilm"] == ["2"]
    index = kserve.RepositoryIndex(kpb.RepositoryIndexRequest())
    assert ("minilm", "1", "UNAVAILABLE") in [(m.name, m.version, m.state) for m in index.models]


def test_queue_full_is_resource_exhausted(stub):
    stub.LoadModel(pb.LoadModelRequest(name="tiny-queue", model_uri=f"builtin://{MODEL}", config=pb.ModelConfig(
        batching=pb.BatchingConfig(enabled=True, max_batch_size=1, max_queue_size=1))))
    codes = []

    def call(i):
        try:
            stub.Embed(pb.EmbedRequest(model="tiny-queue", texts=["a fairly long sentence to embed " * 8]))
            return grpc.StatusCode.OK
        except grpc.RpcError as exc:
            return exc.code()

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(call, range(32)))
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes and grpc.StatusCode.OK in codes
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    stub.UnloadModel(pb.UnloadModelRequest(name="tiny-queue"))


def test_deadline_and_the_server_stays_up(stub):
    with pytest.raises(grpc.RpcError) as info:
        stub.Embed(pb.EmbedRequest(model=MODEL, texts=["deadline " * 100] * 64), timeout=0.005)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(stub.Embed(pb.EmbedRequest(model=MODEL, texts=["still here"])).embeddings) == 1


@pytest.mark.parametrize("mutate, code, field", [
    (lambda r: r.inputs[0].__setattr__("datatype", "FP32"), grpc.StatusCode.INVALID_ARGUMENT, "inputs[0].datatype"),
    (lambda r: r.inputs[0].shape.__setitem__(0, 5), grpc.StatusCode.INVALID_ARGUMENT, "inputs[0].shape"),
    (lambda r: r.inputs[0].__setattr__("name", "txt"), grpc.StatusCode.INVALID_ARGUMENT, "inputs"),
    (lambda r: r.raw_input_contents.__setitem__(0, b"\x09\x00"), grpc.StatusCode.INVALID_ARGUMENT,
     "raw_input_contents"),
    (lambda r: r.__setattr__("model_name", "missing"), grpc.StatusCode.NOT_FOUND, None),
    (lambda r: r.__setattr__("model_version", "99"), grpc.StatusCode.NOT_FOUND, None),
    (lambda r: r.parameters["truncate"].__setattr__("string_param", "yes"), grpc.StatusCode.INVALID_ARGUMENT,
     "parameters.truncate"),
    (lambda r: r.parameters["priority"].__setattr__("string_param", "high"), grpc.StatusCode.INVALID_ARGUMENT,
     "parameters.priority"),
])
def test_bad_kserve_requests(kserve, mutate, code, field):
    request = text_request(MODEL, ["one", "two"])
    mutate(request)
    with pytest.raises(grpc.RpcError) as info:
        kserve.ModelInfer(request)
    assert info.value.code() == code
    if field:
        assert field_of(info.value) == field


def test_a_bad_parameter_streamed_to_an_encoder_is_an_invalid_argument(kserve):
    request = text_request(MODEL, ["one"])
    request.inputs[0].name = "text_input"
    request.parameters["temperature"].string_param = "warm"
    (response,) = kserve.ModelStreamInfer(iter([request]))
    assert response.error_message.startswith("InvalidArgument") and "temperature" in response.error_message


def test_long_texts_refused_unless_truncated(stub, kserve):
    long = "word " * 400
    with pytest.raises(grpc.RpcError) as info:
        stub.Embed(pb.EmbedRequest(model=MODEL, texts=["fine", long]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field_of(info.value) == "texts[1]"
    assert len(stub.Embed(pb.EmbedRequest(model=MODEL, texts=[long], truncate=True)).embeddings) == 1
    request = text_request(MODEL, [long])
    request.parameters["truncate"].bool_param = True
    assert kserve.ModelInfer(request).outputs[0].shape == [1, 384]
    with pytest.raises(grpc.RpcError) as info:
        stub.Embed(pb.EmbedRequest(model=MODEL, texts=[]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_repository_extension_load_and_unload(kserve, stub):
    kserve.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name="minilm"))
    assert kserve.ModelReady(kpb.ModelReadyRequest(name="minilm", version="2")).ready
    kserve.RepositoryModelUnload(kpb.RepositoryModelUnloadRequest(model_name="minilm"))
    assert not kserve.ModelReady(kpb.ModelReadyRequest(name="minilm")).ready
    with pytest.raises(grpc.RpcError) as info:
        kserve.ModelInfer(text_request("minilm", ["x"]))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_onnx_runtime_backend_matches_the_reference(stub, reference):
    status = stub.LoadModel(pb.LoadModelRequest(name="minilm-onnx", config=pb.ModelConfig(
        backend=pb.BACKEND_ONNXRUNTIME, task=pb.MODEL_TASK_EMBEDDING))).status
    assert status.state == pb.MODEL_STATE_READY and status.config.backend == pb.BACKEND_ONNXRUNTIME
    got = np.array([e.values for e in stub.Embed(pb.EmbedRequest(model="minilm-onnx", texts=TEXTS)).embeddings])
    assert np.abs(got - reference).max() < 1e-4
    # A sound request for an artifact that cannot serve it: the PyTorch folder has no ONNX graph.
    with pytest.raises(grpc.RpcError) as info:
        stub.LoadModel(pb.LoadModelRequest(name="minilm", version="9", model_uri="artifact://models/minilm/1",
                                           config=pb.ModelConfig(backend=pb.BACKEND_ONNXRUNTIME)))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.details().startswith("config.backend asks for ONNX Runtime")
    # Asking for nothing, the export is served on ONNX Runtime and the PyTorch folder on PyTorch.
    onnx = stub.LoadModel(pb.LoadModelRequest(name="minilm-onnx-2", model_uri="artifact://models/minilm-onnx/1"))
    torch = stub.LoadModel(pb.LoadModelRequest(name="minilm", version="9", model_uri="artifact://models/minilm/1"))
    assert (onnx.status.config.backend, torch.status.config.backend) == (pb.BACKEND_ONNXRUNTIME, pb.BACKEND_PYTORCH)
    for name in ("minilm-onnx-2", "minilm"):
        stub.UnloadModel(pb.UnloadModelRequest(name=name))
