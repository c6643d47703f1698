"""ImportModel end to end: a real inference server imports tiny Hugging Face checkpoints built here (from a
folder under its FASTSERVE_IMPORT_ROOTS and by upload), serves them with greedy parity against transformers'
generate, and refuses bad imports with the right status and field, publishing nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

from fastserve.client.errors import ClientError
from fastserve.client.model_import import import_model, local_files
from fastserve.inference.v1 import inference_pb2 as ipb
from fastserve.inference.v1 import inference_pb2_grpc
from fastserve.registry.v1 import registry_pb2 as pb
from fastserve.registry.v1 import registry_pb2_grpc
from fastserve.storage.artifacts import STAGING, ArtifactStore
from tests.support.processes import start_inference
from tests.support.rpc import field_of
from tests.support.tiny_models import build_causal_lm

PROMPT = "Return the number of"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """Tiny GPT-2 and Llama checkpoints, trained a few steps so that greedy choices are not near-ties."""
    base = tmp_path_factory.mktemp("built")
    return {family: build_causal_lm(base / family, family, hidden=32, vocab=300, documents=300, train_steps=20)
            for family in ("gpt2", "llama")}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("import-root")


@pytest.fixture(scope="module")
def server(tmp_path_factory, root):
    home = tmp_path_factory.mktemp("import-server") / "home"
    proc = start_inference(home, tmp_path_factory.mktemp("l") / "inf.log", FASTSERVE_INFERENCE_MODELS="none",
                           FASTSERVE_IMPORT_ROOTS=f"{tmp_path_factory.mktemp('other-root')},{root}")
    proc.home = home
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.target) as channel:
        yield channel


@pytest.fixture(scope="module")
def registry(channel):
    return registry_pb2_grpc.RegistryServiceStub(channel)


@pytest.fixture(scope="module")
def inference(channel):
    return inference_pb2_grpc.InferenceServiceStub(channel)


def server_import(registry, name: str, server_path: str, **header) -> pb.ImportModelResponse:
    request = pb.ImportModelRequest(header=pb.ImportHeader(name=name, server_path=server_path, **header))
    return registry.ImportModel(iter([request]))


def place(root: Path, source: Path, name: str, drop: tuple[str, ...] = ()) -> Path:
    """A copy of `source` under the import root, less the files `drop` names."""
    folder = root / name
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns(*drop) if drop else None)
    return folder


def assert_nothing_published(server, name: str) -> None:
    store = ArtifactStore(server.home / "artifacts")
    assert store.versions("models", name) == []
    assert [p.name for p in (store.root / STAGING).iterdir() if p.name.startswith(f"models-{name}-")] == []


def hf_greedy(folder: Path, n: int) -> list[int]:
    """transformers' own greedy generate on `folder`, cut before its EOS as the service does."""
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    ids = torch.tensor([Tokenizer.from_file(str(folder / "tokenizer.json")).encode(PROMPT).ids])
    new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)[0, ids.shape[1]:]
    eos = model.generation_config.eos_token_id
    return new.tolist()[:new.tolist().index(eos)] if eos in new.tolist() else new.tolist()


def serves_like(inference, name: str, reference: Path, n: int = 16) -> None:
    request = ipb.LoadModelRequest(name=name, model_uri=f"artifact://models/{name}/latest")
    status = inference.LoadModel(request).status
    assert status.state == ipb.MODEL_STATE_READY
    reply = inference.Generate(ipb.GenerateRequest(model=name, text=PROMPT,
                                                   sampling=ipb.SamplingParams(max_new_tokens=n)))
    assert list(reply.token_ids) == hf_greedy(reference, n)
    inference.UnloadModel(ipb.UnloadModelRequest(name=name))


def test_a_server_folder_is_copied_and_serves_like_transformers(server, registry, inference, root, built):
    folder = place(root, built["llama"], "llama")
    reply = server_import(registry, "imp-llama", "llama")
    assert reply.artifact.ref.uri == "artifact://models/imp-llama/1"
    assert (reply.architecture, reply.kind, reply.default_task) == ("LlamaForCausalLM", "decoder", "generation")
    assert {f.path for f in reply.artifact.files} == {p.name for p in folder.iterdir()}
    source = dict(reply.artifact.metadata["source"])
    assert source == {"type": "import", "from": "server", "path": "llama", "converted_pickle": False}
    assert reply.artifact.metadata["model_type"] == "llama"
    assert (folder / "model.safetensors").is_file()  # copied, not moved
    serves_like(inference, "imp-llama", built["llama"])


def test_an_upload_by_the_client_serves_like_transformers(server, registry, inference, built):
    reply = import_model(registry, built["gpt2"], "imp-gpt2")
    assert reply.artifact.ref.uri == "artifact://models/imp-gpt2/1" and reply.architecture == "GPT2LMHeadModel"
    source = dict(reply.artifact.metadata["source"])
    assert source["from"] == "upload" and source["path"] == str(Path(built["gpt2"]).resolve())
    declared = {f.path: f.sha256 for f in local_files(built["gpt2"])}
    assert {f.path: f.sha256 for f in reply.artifact.files} == declared
    serves_like(inference, "imp-gpt2", built["gpt2"])


def test_an_absolute_server_path_inside_a_root_is_accepted(server, registry, root, built):
    place(root, built["gpt2"], "gpt2-abs")
    reply = server_import(registry, "imp-abs", str(root / "gpt2-abs"))
    assert dict(reply.artifact.metadata["source"])["path"] == "gpt2-abs"


def test_sharded_safetensors_import_and_serve(server, registry, inference, root, built):
    folder = root / "sharded"
    AutoModelForCausalLM.from_pretrained(str(built["llama"])).save_pretrained(str(folder), max_shard_size="40KB")
    for name in TOKENIZER_FILES:
        shutil.copy(built["llama"] / name, folder)
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").is_file()
    reply = server_import(registry, "imp-sharded", "sharded")
    assert set(shards) <= {f.path for f in reply.artifact.files}
    serves_like(inference, "imp-sharded", built["llama"])

    missing = place(root, folder, "sharded-missing", drop=(shards[-1],))
    assert not (missing / shards[-1]).exists()
    with pytest.raises(grpc.RpcError) as info:
        server_import(registry, "imp-sharded-missing", "sharded-missing")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and shards[-1] in info.value.details()
    assert_nothing_published(server, "imp-sharded-missing")


def pickled(root: Path, source: Path, name: str) -> Path:
    """`source` with its weights as a pickle `pytorch_model.bin` (tied tensors sharing memory) instead."""
    folder = place(root, source, name, drop=("model.safetensors",))
    model = AutoModelForCausalLM.from_pretrained(str(source))
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


def test_pickle_weights_are_refused_unless_converted(server, registry, inference, root, built):
    pickled(root, built["gpt2"], "pickled")
    with pytest.raises(grpc.RpcError) as info:
        server_import(registry, "imp-pickled", "pickled")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert field_of(info.value) == "header.convert_pickle_weights" and "pytorch_model.bin" in info.value.details()
    assert_nothing_published(server, "imp-pickled")

    reply = server_import(registry, "imp-pickled", "pickled", convert_pickle_weights=True)
    files = {f.path for f in reply.artifact.files}
    assert "model.safetensors" in files and "pytorch_model.bin" not in files
    assert dict(reply.artifact.metadata["source"])["converted_pickle"] is True
    serves_like(inference, "imp-pickled", built["gpt2"])


def test_sharded_pickle_weights_are_converted_shard_for_shard(server, registry, inference, root, built):
    from safetensors.torch import load_file

    folder = root / "sharded-pickle"
    AutoModelForCausalLM.from_pretrained(str(built["llama"])).save_pretrained(str(folder), max_shard_size="40KB")
    for name in TOKENIZER_FILES:
        shutil.copy(built["llama"] / name, folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        torch.save(load_file(str(folder / shard)), folder / f"pytorch_{shard.removesuffix('.safetensors')}.bin")
        (folder / shard).unlink()
    index["weight_map"] = {k: f"pytorch_{v.removesuffix('.safetensors')}.bin" for k, v in index["weight_map"].items()}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (folder / "model.safetensors.index.json").unlink()
    reply = server_import(registry, "imp-sharded-pickle", "sharded-pickle", convert_pickle_weights=True)
    files = {f.path for f in reply.artifact.files}
    assert "model.safetensors.index.json" in files and not any(f.endswith(".bin") for f in files)
    assert len([f for f in files if f.startswith("model-")]) == len(set(index["weight_map"].values())) > 1
    serves_like(inference, "imp-sharded-pickle", built["llama"])


def test_an_uploaded_pickle_is_converted_too(server, registry, root, built):
    folder = pickled(root, built["llama"], "pickled-upload")
    reply = import_model(registry, folder, "imp-pickled-upload", convert_pickle_weights=True)
    assert "model.safetensors" in {f.path for f in reply.artifact.files}
    assert "pytorch_model.bin" not in {f.path for f in reply.artifact.files}


def edited_config(root: Path, source: Path, name: str, **changes) -> str:
    folder = place(root, source, name)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return name


@pytest.mark.parametrize("case, code, field, words", [
    ("no-tokenizer", "FAILED_PRECONDITION", "header.server_path", "tokenizer.json"),
    ("remote-code", "FAILED_PRECONDITION", "header.server_path", "auto_map"),
    ("python-file", "FAILED_PRECONDITION", "header.server_path", "trust_remote_code"),
    ("unsupported", "FAILED_PRECONDITION", "header.server_path", "supported: decoders gpt2, llama"),
    ("not-json", "FAILED_PRECONDITION", "header.server_path", "config.json is not JSON"),
    ("no-model-type", "FAILED_PRECONDITION", "header.server_path", "config.json has no model_type"),
    ("unknown-file", "FAILED_PRECONDITION", "header.server_path", "run.sh"),
    ("missing", "NOT_FOUND", "header.server_path", "not a folder"),
    ("outside", "INVALID_ARGUMENT", "header.server_path", "import root"),
    ("dotdot", "INVALID_ARGUMENT", "header.server_path", "import root"),
    ("symlink-out", "INVALID_ARGUMENT", "header.server_path", "import root"),
    ("file-symlink-out", "INVALID_ARGUMENT", "header.server_path", "leads outside"),
    ("loop", "FAILED_PRECONDITION", "header.server_path", ""),
])
def test_bad_server_folders_are_refused_and_publish_nothing(server, registry, root, built, tmp_path,
                                                            case, code, field, words):
    source, name = built["gpt2"], f"bad-{case}"
    if case == "no-tokenizer":
        place(root, source, case, drop=("tokenizer.json",))
    elif case == "remote-code":
        edited_config(root, source, case, auto_map={"AutoModelForCausalLM": "modeling.MyModel"})
    elif case == "python-file":
        (place(root, source, case) / "modeling.py").write_text("print('hi')\n")
    elif case == "unsupported":
        edited_config(root, source, case, model_type="mamba")
    elif case == "not-json":
        (place(root, source, case) / "config.json").write_text("{not json")
    elif case == "no-model-type":
        folder = place(root, source, case)
        config = json.loads((folder / "config.json").read_text())
        del config["model_type"]
        (folder / "config.json").write_text(json.dumps(config))
    elif case == "unknown-file":
        (place(root, source, case) / "run.sh").write_text("#!/bin/sh\n")
    elif case == "outside":
        place(tmp_path, source, case)
        case = str(tmp_path / case)
    elif case == "dotdot":
        place(tmp_path, source, case)
        case = os.path.relpath(tmp_path / case, root)
    elif case == "symlink-out":
        place(tmp_path, source, case)
        (root / case).symlink_to(tmp_path / case)
    elif case == "loop":
        (place(root, source, case) / "vocab.json").symlink_to("vocab.json")
    elif case == "file-symlink-out":
        place(root, source, case, drop=("tokenizer.json",))
        (root / case / "tokenizer.json").symlink_to(source / "tokenizer.json")
    with pytest.raises(grpc.RpcError) as info:
        server_import(registry, name, case)
    assert info.value.code().name == code, info.value.details()
    assert field_of(info.value) == field and words in info.value.details()
    assert_nothing_published(server, name)


def test_a_symlink_inside_the_root_is_followed(server, registry, root, built):
    # A Hugging Face cache snapshot is symlinks into the cache's blobs: inside the root, they are fine.
    place(root, built["gpt2"], "blobs")
    snapshot = root / "snapshot"
    snapshot.mkdir()
    for item in (root / "blobs").iterdir():
        (snapshot / item.name).symlink_to(item)
    reply = server_import(registry, "imp-snapshot", "snapshot")
    assert {f.path for f in reply.artifact.files} == {p.name for p in snapshot.iterdir()}


def upload(header: pb.ImportHeader, chunks: list[pb.FileChunk]):
    yield pb.ImportModelRequest(header=header)
    for chunk in chunks:
        yield pb.ImportModelRequest(chunk=chunk)


def chunks_of(folder: Path, size: int = 1 << 20) -> list[pb.FileChunk]:
    chunks = []
    for f in local_files(folder):
        data = (folder / f.path).read_bytes()
        chunks += [pb.FileChunk(path=f.path, offset=i, data=data[i:i + size]) for i in range(0, len(data), size)]
    return chunks


def bad_upload(case: str, folder: Path) -> tuple[pb.ImportHeader, list[pb.FileChunk]]:
    files, chunks = local_files(folder), chunks_of(folder, 4096)
    header = pb.ImportHeader(name=f"bad-up-{case}", files=files)
    weights = next(i for i, c in enumerate(chunks) if c.path == "model.safetensors")
    if case == "truncated":
        del chunks[weights + 1:]  # the stream ends after the first chunk of the weights
    elif case == "checksum":
        header.files[[f.path for f in files].index("config.json")].sha256 = "0" * 64
    elif case == "gap":
        del chunks[weights + 1]
    elif case == "overlong":
        header.files[[f.path for f in files].index("config.json")].size_bytes -= 1
    elif case == "undeclared":
        chunks.append(pb.FileChunk(path="extra.json", offset=0, data=b"{}"))
    elif case == "dotdot":
        header.files[0].path = "../config.json"
    elif case == "manifest":
        header.files[0].path = "manifest.json"
    elif case == "no-files":
        del header.files[:]
    elif case == "pickle":
        header.files.add(path="pytorch_model.bin", size_bytes=1, sha256="0" * 64)
    return header, chunks


@pytest.mark.parametrize("case, code, field, words", [
    ("truncated", "INVALID_ARGUMENT", "header.files", "got 4096 of"),
    ("checksum", "INVALID_ARGUMENT", "header.files", "config.json has sha256"),
    ("gap", "INVALID_ARGUMENT", "chunk.offset", "next byte is at 4096"),
    ("overlong", "INVALID_ARGUMENT", "chunk.data", "more than its declared"),
    ("undeclared", "INVALID_ARGUMENT", "chunk.path", "extra.json"),
    ("dotdot", "INVALID_ARGUMENT", "header.files[0].path", "'..'"),
    ("manifest", "INVALID_ARGUMENT", "header.files[0].path", "reserved"),
    ("no-files", "INVALID_ARGUMENT", "header.files", "lists its files"),
    ("pickle", "FAILED_PRECONDITION", "header.files", "both safetensors and pickle"),
])
def test_bad_uploads_are_refused_and_publish_nothing(server, registry, built, case, code, field, words):
    header, chunks = bad_upload(case, built["gpt2"])
    with pytest.raises(grpc.RpcError) as info:
        registry.ImportModel(upload(header, chunks))
    assert info.value.code().name == code, info.value.details()
    assert field_of(info.value) == field and words in info.value.details()
    assert_nothing_published(server, header.name)


def test_a_retried_import_returns_the_first_version(server, registry, root, built):
    place(root, built["gpt2"], "retried")
    first = server_import(registry, "imp-retried", "retried", request_id="req-1")
    again = server_import(registry, "imp-retried", "retried", request_id="req-1")
    uploaded = import_model(registry, built["gpt2"], "imp-retried", request_id="req-1")
    other = server_import(registry, "imp-retried", "retried", request_id="req-2")
    assert first.artifact.ref.uri == again.artifact.ref.uri == uploaded.artifact.ref.uri \
        == "artifact://models/imp-retried/1"
    assert other.artifact.ref.uri == "artifact://models/imp-retried/2"
    assert ArtifactStore(server.home / "artifacts").versions("models", "imp-retried") == [1, 2]


def test_the_client_refuses_a_symlink_in_the_folder_before_the_call(tmp_path, built):
    folder = place(tmp_path, built["gpt2"], "linked")
    (folder / "README.md").symlink_to(built["gpt2"] / "config.json")
    with pytest.raises(ValueError, match="README.md is a symlink"):
        local_files(folder)


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    """A server with a size limit of about 10 kB and no import roots."""
    proc = start_inference(tmp_path_factory.mktemp("limited") / "home", tmp_path_factory.mktemp("l") / "inf.log",
                           FASTSERVE_INFERENCE_MODELS="none", FASTSERVE_IMPORT_MAX_GB="0.00001")
    with grpc.insecure_channel(proc.target) as channel:
        yield registry_pb2_grpc.RegistryServiceStub(channel)
    proc.stop()


def test_server_paths_are_off_without_import_roots(limited):
    with pytest.raises(grpc.RpcError) as info:
        server_import(limited, "anything", "some/folder")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert field_of(info.value) == "header.server_path" and "FASTSERVE_IMPORT_ROOTS" in info.value.details()


def test_an_upload_over_the_size_limit_is_refused_before_its_bytes(limited, built):
    with pytest.raises(ClientError) as info:
        import_model(limited, built["gpt2"], "too-big")
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.fields == ["header.files"] and "FASTSERVE_IMPORT_MAX_GB" in info.value.message


def fastserve(server, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FASTSERVE_INFERENCE_PORT": str(server.port), "FASTSERVE_HOME": str(server.home)}
    return subprocess.run([str(Path(sys.executable).with_name("fastserve")), *args], env=env, capture_output=True,
                          text=True, timeout=120)


def test_cli_import_round_trip(server, inference, root, built):
    done = fastserve(server, "models", "import", str(built["gpt2"]), "--name", "cli-gpt2")
    assert done.returncode == 0, done.stderr
    assert "imported artifact://models/cli-gpt2/1 (GPT2LMHeadModel, decoder" in done.stdout
    assert "fastserve models load cli-gpt2 --uri artifact://models/cli-gpt2/latest" in done.stdout
    place(root, built["gpt2"], "cli-folder")
    done = fastserve(server, "models", "import", "cli-folder", "--name", "cli-gpt2", "--on-server", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["artifact"]["ref"]["uri"] == "artifact://models/cli-gpt2/2"
    done = fastserve(server, "models", "import", "no-such-folder", "--name", "cli-bad")
    assert done.returncode != 0 and "NOT_FOUND" in done.stderr and "no-such-folder" in done.stderr
    assert "Traceback" not in done.stderr
    request = ipb.LoadModelRequest(name="cli-gpt2", model_uri="artifact://models/cli-gpt2/latest")
    status = inference.LoadModel(request).status
    assert status.state == ipb.MODEL_STATE_READY


@pytest.fixture(scope="module")
def training_stack(tmp_path_factory, redis_server):
    """Training (its server and a worker) and inference on one home, so that training sees the imports."""
    from tests.conftest import private_env
    from tests.support.processes import start_service, start_worker

    logs = tmp_path_factory.mktemp("ft-logs")
    env = private_env(tmp_path_factory.mktemp("ft") / "home", redis_server.url)
    procs = [start_inference(Path(env["FASTSERVE_HOME"]), logs / "inf.log", FASTSERVE_INFERENCE_MODELS="none")]
    try:
        procs.append(start_service("training", env, logs))
        procs.append(start_worker(env, logs))
        yield env, procs[0], procs[1]
    finally:
        for proc in reversed(procs):
            proc.stop()


def test_training_fine_tunes_an_imported_model(training_stack, built):
    from safetensors.torch import load_file

    from fastserve.common.v1 import jobs_pb2
    from fastserve.runtime.config import Config
    from fastserve.runtime.stores import Stores
    from fastserve.services.preprocessing.core import Preprocessing
    from fastserve.training.v1 import training_pb2 as tpb
    from fastserve.training.v1 import training_pb2_grpc

    env, inference_proc, training_proc = training_stack
    with grpc.insecure_channel(inference_proc.target) as channel:
        base = import_model(registry_pb2_grpc.RegistryServiceStub(channel), built["gpt2"], "ft-base").artifact.ref.uri
    stores = Stores.from_config(Config.from_env(env))
    source = {"builtin": {"name": "stdlib-docstrings", "seed": 0, "max_documents": 200}}
    dataset = Preprocessing(stores).run_build_dataset({
        "source": source, "tokenizer_uri": base, "task": "causal_lm", "max_length": 32,
        "splits": {"validation_fraction": 0.1, "seed": 0}, "output_name": "ft-clm"})["dataset_uri"]
    with grpc.insecure_channel(training_proc.target) as channel:
        stub = training_pb2_grpc.TrainingServiceStub(channel)
        job = stub.SubmitTrainingJob(tpb.SubmitTrainingJobRequest(
            model=tpb.ModelSpec(pretrained_uri=base), task=tpb.TRAINING_TASK_CAUSAL_LM, dataset_uri=dataset,
            output_name="ft-tuned", hyperparameters=tpb.Hyperparameters(
                learning_rate=1e-3, batch_size=8, max_steps=5, warmup_steps=1, log_interval_steps=1, seed=0))).job
        list(stub.WatchJob(tpb.WatchJobRequest(job_id=job.job_id), timeout=300))
        done = stub.GetJob(tpb.GetJobRequest(job_id=job.job_id)).job
    assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED, done.error
    tuned = stores.artifacts.resolve(done.result["model_uri"]).path / "model.safetensors"
    before, after = load_file(str(built["gpt2"] / "model.safetensors")), load_file(str(tuned))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the steps changed the imported weights


def test_import_roots_take_colons_or_commas_and_refuse_a_relative_root(tmp_path):
    from fastserve.runtime.config import Config
    from fastserve.runtime.errors import FailedPrecondition
    from fastserve.services.inference.importing import import_roots

    config = Config.from_env({"FASTSERVE_IMPORT_ROOTS": f"{tmp_path}/a:{tmp_path}/b, {tmp_path}/c,"})
    assert import_roots(config) == [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    with pytest.raises(FailedPrecondition) as info:
        import_roots(Config.from_env({"FASTSERVE_IMPORT_ROOTS": "models"}))
    assert field_of(info.value) == "FASTSERVE_IMPORT_ROOTS"
