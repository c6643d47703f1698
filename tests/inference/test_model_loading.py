"""Loading models as they are published, through a real inference server and the official client: the
README's optimized MiniLM (ONNX, int8) by its name alone, a folder that cannot load, a reload that keeps
a model's settings, and mistyped names."""

from __future__ import annotations

import shutil
import time

import grpc
import numpy as np
import pytest

from fastserve.client import ClientError, FastServeClient
from fastserve.inference.v1 import inference_pb2 as pb
from fastserve.inference.v1 import inference_pb2_grpc
from fastserve.kserve.v2 import grpc_service_pb2 as kpb
from fastserve.kserve.v2 import grpc_service_pb2_grpc
from fastserve.models.refs import BUILTIN_MODELS
from fastserve.storage.artifacts import ArtifactStore
from tests.support.processes import start_inference
from tests.support.rpc import field_of

MINILM = "all-MiniLM-L6-v2"
TEXTS = ["FastServe takes a model from raw text to an endpoint.", "hello world",
         "Return the number of items in a container.", "Ünïcödé text, too!"]


def publish_minilm_int8(store: ArtifactStore, work) -> None:
    """What `optimize submit builtin://all-MiniLM-L6-v2 --step export:onnx --step quantize:onnx_int8_dynamic
    --output minilm-int8` publishes, made with the optimization service's own steps: the export's folder
    (model.onnx beside the config and tokenizer, no PyTorch weights) with its graph quantized."""
    from fastserve.services.optimization.export import export_encoder_onnx
    from fastserve.services.optimization.quantize import quantize_onnx_int8_dynamic

    exported = work / "export"
    export_encoder_onnx(BUILTIN_MODELS[MINILM](), exported)
    with store.publish("models", "minilm-int8") as draft:
        for item in exported.iterdir():
            if item.is_file() and item.suffix != ".onnx":
                shutil.copy(item, draft.path / item.name)
        quantize_onnx_int8_dynamic(exported / "model.onnx", draft.path / "model.onnx")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_gpt):
    """A server whose store holds minilm-int8, a MiniLM whose weights were cut short in copying, and two
    versions of a tiny GPT; it loads MiniLM and, from FASTSERVE_INFERENCE_MODELS, minilm-int8 at start."""
    root = tmp_path_factory.mktemp("loading")
    store = ArtifactStore(root / "home" / "artifacts")
    publish_minilm_int8(store, root)
    source = BUILTIN_MODELS[MINILM]()
    with store.publish("models", "half-copied") as draft:
        for item in source.iterdir():
            if item.is_file():
                shutil.copy(item, draft.path / item.name)
        weights = draft.path / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100_000])
    for _ in range(2):
        with store.publish("models", "tiny-gpt") as draft:
            for item in tiny_gpt.iterdir():
                shutil.copy(item, draft.path / item.name)
    proc = start_inference(root / "home", root / "inference.log", FASTSERVE_INFERENCE_MODELS=(
        f"{MINILM}=builtin://{MINILM},int8-at-start=artifact://models/minilm-int8/1"))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def fs(server):
    with FastServeClient(ports={"inference": server.port}) as client:
        yield client.inference


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


@pytest.fixture(scope="module")
def kserve(server):
    with grpc.insecure_channel(server.target) as channel:
        yield grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)


def served(fs, name: str) -> list[pb.ModelStatus]:
    return [m for m in fs.list_models() if m.name == name]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_the_optimized_model_loads_by_its_name_alone_on_onnx_runtime(fs):
    status = fs.load_model("minilm-int8")
    assert status.state == pb.MODEL_STATE_READY and status.model_uri == "artifact://models/minilm-int8/1"
    [listed] = served(fs, "minilm-int8")
    assert listed.config.backend == pb.BACKEND_ONNXRUNTIME and listed.config.task == pb.MODEL_TASK_EMBEDDING
    int8 = np.array([e.values for e in fs.embed("minilm-int8", TEXTS).embeddings])
    fp32 = np.array([e.values for e in fs.embed(MINILM, TEXTS).embeddings])
    assert int8.shape == fp32.shape == (len(TEXTS), 384)
    assert cosines(int8, fp32).min() > 0.95 and np.abs(int8 - fp32).max() > 0  # close, yet really quantized


def test_the_models_the_server_starts_with_resolve_their_backend_the_same_way(fs):
    [started] = served(fs, "int8-at-start")
    assert started.state == pb.MODEL_STATE_READY and started.config.backend == pb.BACKEND_ONNXRUNTIME
    [minilm] = served(fs, MINILM)
    assert minilm.config.backend == pb.BACKEND_PYTORCH


def test_repository_load_resolves_the_backend_too(kserve, fs):
    kserve.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name="minilm-int8"))
    meta = kserve.ModelMetadata(kpb.ModelMetadataRequest(name="minilm-int8"))
    assert meta.platform == "onnxruntime_embedding"
    request = kpb.RepositoryModelLoadRequest(model_name="int8-kserve")
    request.parameters["uri"].string_param = "artifact://models/minilm-int8/1"
    request.parameters["backend"].string_param = "tensorflow"
    with pytest.raises(grpc.RpcError) as info:
        kserve.RepositoryModelLoad(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field_of(info.value) == "parameters.backend"
    request.parameters["backend"].string_param = "pytorch"
    with pytest.raises(grpc.RpcError) as info:
        kserve.RepositoryModelLoad(request)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "config.backend" in info.value.details()


def test_pytorch_asked_for_an_onnx_only_folder_is_a_failed_precondition(fs):
    with pytest.raises(ClientError) as info:
        fs.load_model("int8-on-torch", "artifact://models/minilm-int8/1", backend="pytorch")
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.message.startswith("config.backend asks for PyTorch") and "only an ONNX graph" in \
        info.value.message
    with pytest.raises(ClientError) as info:
        fs.load_model("torch-on-onnx", f"builtin://{MINILM}", backend="onnxruntime")
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION and "has no model.onnx" in info.value.message


def test_a_folder_that_cannot_load_fails_at_once_and_gives_way_to_a_new_load(fs):
    with pytest.raises(ClientError) as info:
        fs.load_model("half-copied")
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "half-copied/1" in info.value.message and "SafetensorError" in info.value.message
    [failed] = served(fs, "half-copied")
    assert failed.state == pb.MODEL_STATE_FAILED and "SafetensorError" in failed.error

    # The client retries UNAVAILABLE five times with backoff; a model that failed to load must not look
    # transient, so the very first answer is final.
    start = time.monotonic()
    with pytest.raises(ClientError) as info:
        fs.embed("half-copied", ["x"])
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION and info.value.attempts == 1
    assert time.monotonic() - start < 1.0
    assert info.value.message.startswith("model half-copied version 1 failed to load: ")
    assert info.value.message.endswith("; load it again or unload it")
    with pytest.raises(ClientError) as info:
        fs.classify("half-copied", ["x"])
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION and info.value.attempts == 1
    assert [s.version for s in fs.model_statistics("half-copied")] == ["1"]  # its status is still there to read

    status = fs.load_model("half-copied", f"builtin://{MINILM}", version="1")
    assert status.state == pb.MODEL_STATE_READY and status.version == "1"
    assert len(fs.embed("half-copied", ["x"]).embeddings) == 1


MLFQ = pb.ModelConfig(scheduling=pb.SCHEDULING_POLICY_MLFQ, batching=pb.BatchingConfig(max_batch_size=6),
                      generation=pb.GenerationConfig(kv_slots=8, mlfq_levels=3, mlfq_base_quantum=4))


def assert_mlfq(status: pb.ModelStatus) -> None:
    c = status.config
    assert (c.scheduling, c.batching.max_batch_size, c.generation.kv_slots, c.generation.mlfq_levels,
            c.generation.mlfq_base_quantum, c.task) == (pb.SCHEDULING_POLICY_MLFQ, 6, 8, 3, 4,
                                                         pb.MODEL_TASK_GENERATION)


def test_a_reload_without_a_config_keeps_the_served_settings(stub, fs):
    first = stub.LoadModel(pb.LoadModelRequest(name="tiny-gpt", model_uri="artifact://models/tiny-gpt/1",
                                               config=MLFQ)).status
    assert first.version == "1"
    assert_mlfq(first)
    # The name alone: the newest version (2) takes over with the settings version 1 was served with.
    second = stub.LoadModel(pb.LoadModelRequest(name="tiny-gpt")).status
    assert second.version == "2" and second.state == pb.MODEL_STATE_READY
    assert_mlfq(second)
    assert [m.version for m in served(fs, "tiny-gpt")] == ["2"]
    # The official client always sends a ModelConfig; an empty one asks for nothing either.
    assert_mlfq(fs.load_model("tiny-gpt", "artifact://models/tiny-gpt/1"))
    assert fs.generate("tiny-gpt", "Return the").usage.completion_tokens > 0

    # An explicit config replaces the settings, even of the version already serving.
    fcfs = stub.LoadModel(pb.LoadModelRequest(name="tiny-gpt", model_uri="artifact://models/tiny-gpt/1",
                                              config=pb.ModelConfig(scheduling=pb.SCHEDULING_POLICY_FCFS))).status
    assert fcfs.version == "1" and fcfs.config.scheduling == pb.SCHEDULING_POLICY_FCFS
    assert fcfs.config.batching.max_batch_size == 32
    [listed] = served(fs, "tiny-gpt")
    assert listed.config.scheduling == pb.SCHEDULING_POLICY_FCFS and listed.state == pb.MODEL_STATE_READY
    fs.unload_model("tiny-gpt")


def test_a_mistyped_name_suggests_the_close_one(fs, kserve):
    fs.load_model("minilm-int8")
    for call in (lambda: fs.embed("minilm-in8", ["x"]), lambda: fs.model_status("minilm-in8"),
                 lambda: fs.model_statistics("minilm-in8"), lambda: fs.unload_model("minilm-in8")):
        with pytest.raises(ClientError) as info:
            call()
        assert info.value.code == grpc.StatusCode.NOT_FOUND
        assert info.value.message == "model 'minilm-in8' is not loaded; did you mean 'minilm-int8'?"
    with pytest.raises(grpc.RpcError) as info:
        kserve.ModelMetadata(kpb.ModelMetadataRequest(name="minilm-in8"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "did you mean 'minilm-int8'?" in info.value.details()

    # Loading by a mistyped name: no artifact of that name, and the close one is offered.
    with pytest.raises(ClientError) as info:
        fs.load_model("minilm-in8")
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert info.value.fields == ["name"]
    assert info.value.message == "no artifact models/minilm-in8; did you mean " \
                                 "'artifact://models/minilm-int8/latest'?"
    with pytest.raises(ClientError) as info:
        fs.load_model("m", "artifact://models/minilm-int8/9")
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert info.value.fields == ["model_uri"]
    assert info.value.message == "no artifact models/minilm-int8/9; its published versions: 1"
    with pytest.raises(ClientError) as info:
        fs.load_model("m", "builtin://all-MiniLM-L6-v3")
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert info.value.fields == ["model_uri"]
    assert info.value.message == "no built-in model 'all-MiniLM-L6-v3'; did you mean " \
                                 "'builtin://all-MiniLM-L6-v2'?"
