import os
import shutil

import pytest

from fastserve.runtime.errors import AlreadyExists, InvalidArgument, NotFound
from fastserve.storage.artifacts import ArtifactStore, parse_uri, safe_join
from tests.support.rpc import field_of


@pytest.fixture
def store(tmp_path):
    return ArtifactStore(tmp_path / "artifacts")


def _publish(store, name="tiny", text="hello", **kwargs):
    with store.publish("datasets", name, metadata={"rows": 1}, **kwargs) as draft:
        (draft.path / "data.txt").write_text(text)
        (draft.path / "sub").mkdir()
        (draft.path / "sub" / "more.bin").write_bytes(b"\0" * 10)
    return draft


def test_publish_versions_and_manifest(store):
    first, second = _publish(store), _publish(store, text="again")
    assert (first.ref.version, second.ref.version) == (1, 2)
    latest = store.resolve("artifact://datasets/tiny/latest")
    assert latest.ref.version == 2 and latest.path == second.path
    assert (latest.path / "data.txt").read_text() == "again"
    files = {f["path"]: f for f in latest.manifest["files"]}
    assert set(files) == {"data.txt", "sub/more.bin"} and files["sub/more.bin"]["size_bytes"] == 10
    assert latest.manifest["metadata"] == {"rows": 1} and latest.size_bytes == 15
    assert store.file(first.ref.uri, "sub/more.bin").read_bytes() == b"\0" * 10
    assert [a.ref.uri for a in store.list("datasets")] == [first.ref.uri, second.ref.uri]


def test_failed_writer_publishes_nothing(store):
    with pytest.raises(RuntimeError):
        with store.publish("datasets", "broken") as draft:
            (draft.path / "part.txt").write_text("half")
            raise RuntimeError("crash mid-write")
    with pytest.raises(NotFound):
        store.resolve("artifact://datasets/broken/latest")
    assert not any((store.root / ".staging").iterdir())


def test_explicit_version_must_be_new(store):
    _publish(store, version=7)
    with pytest.raises(AlreadyExists):
        _publish(store, version=7)
    assert store.versions("datasets", "tiny") == [7]


@pytest.mark.parametrize("uri", [
    "file:///etc/passwd", "artifact://datasets/tiny", "artifact://nokind/tiny/1", "artifact://datasets/../1",
    "artifact://datasets/tiny/0", "artifact://datasets/tiny/1x", "artifact://datasets/tiny/x.y",
    "artifact://datasets/tiny/\u00b2", "artifact://datasets/tiny/-a", "artifact://datasets/tiny/" + "a" * 65,
    "artifact://datasets/.hidden/1",
])
def test_bad_uris_refused(store, uri):
    with pytest.raises(InvalidArgument) as info:
        store.resolve(uri, field_name="dataset_uri")
    assert field_of(info.value) == "dataset_uri"
    assert parse_uri("artifact://models/m/3").version == 3


def test_paths_cannot_escape(store, tmp_path):
    draft = _publish(store)
    for bad in ["../../outside", "/etc/passwd", "sub/../../x", ""]:
        with pytest.raises(InvalidArgument):
            store.file(draft.ref.uri, bad)
    secret = tmp_path / "secret.txt"
    secret.write_text("no")
    os.symlink(secret, draft.path / "link.txt")
    with pytest.raises(InvalidArgument):
        store.file(draft.ref.uri, "link.txt")
    with pytest.raises(InvalidArgument):
        safe_join(store.root, "../x")


def test_symlinked_name_folder_cannot_escape(store, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (store.root / "models").mkdir()
    os.symlink(outside, store.root / "models" / "evil")
    with pytest.raises(InvalidArgument):
        store.resolve("artifact://models/evil/1")
    with pytest.raises(InvalidArgument):
        with store.publish("models", "evil") as d:
            (d.path / "w").write_text("x")
    assert not any(outside.iterdir())


def test_symlink_inside_an_artifact_is_refused_at_publish(store, tmp_path):
    with pytest.raises(InvalidArgument):
        with store.publish("models", "m") as draft:
            os.symlink("/etc/passwd", draft.path / "weights.safetensors")
    assert store.versions("models", "m") == []


def test_a_missing_artifact_names_the_field_and_a_close_name(store):
    _publish(store, name="stdlib-clm")
    _publish(store, name="stdlib-clm")
    with pytest.raises(NotFound) as info:
        store.resolve("artifact://datasets/stdlib-cml/latest", field_name="dataset_uri")
    assert info.value.message == ("no artifact datasets/stdlib-cml; "
                                  "did you mean 'artifact://datasets/stdlib-clm/latest'?")
    assert [v.field for v in info.value.violations] == ["dataset_uri"]
    with pytest.raises(NotFound) as info:
        store.resolve("artifact://datasets/stdlib-clm/3", field_name="dataset_uri")
    assert info.value.message == "no artifact datasets/stdlib-clm/3; its published versions: 1, 2"
    # Only names of the asked kind are suggested, and nothing when nothing is close.
    with pytest.raises(NotFound) as info:
        store.resolve("artifact://models/stdlib-clm/1", field_name="model_uri")
    assert info.value.message == "no artifact models/stdlib-clm"
    with pytest.raises(NotFound) as info:
        store.resolve("artifact://datasets/wikipedia/1", field_name="dataset_uri")
    assert "did you mean" not in info.value.message


# A request for each job service with a URI that names nothing; every field but that one is sound.
MISSING_URIS = [
    ("training", "dataset_uri", lambda pb, uri: ("SubmitTrainingJob", pb.SubmitTrainingJobRequest(
        model=pb.ModelSpec(architecture=pb.ArchitectureConfig(family=pb.ARCHITECTURE_FAMILY_GPT2, num_layers=2,
                                                              hidden_size=64, num_heads=4)),
        task=pb.TRAINING_TASK_CAUSAL_LM, dataset_uri=uri, output_name="never",
        hyperparameters=pb.Hyperparameters(learning_rate=1e-3, batch_size=8, max_steps=10)))),
    ("training", "tokenizer_uri", lambda pb, uri: ("SubmitTrainingJob", pb.SubmitTrainingJobRequest(
        model=pb.ModelSpec(architecture=pb.ArchitectureConfig(family=pb.ARCHITECTURE_FAMILY_GPT2, num_layers=2,
                                                              hidden_size=64, num_heads=4)),
        task=pb.TRAINING_TASK_CAUSAL_LM, dataset_uri="artifact://datasets/clm/1", tokenizer_uri=uri,
        output_name="never", hyperparameters=pb.Hyperparameters(learning_rate=1e-3, batch_size=8, max_steps=10)))),
    ("preprocessing", "source.artifact_uri", lambda pb, uri: ("BuildDataset", pb.BuildDatasetRequest(
        source=pb.CorpusSource(artifact_uri=uri), tokenizer_uri="builtin://all-MiniLM-L6-v2",
        task=pb.DATASET_TASK_CAUSAL_LM, output_name="never"))),
    ("preprocessing", "tokenizer_uri", lambda pb, uri: ("BuildDataset", pb.BuildDatasetRequest(
        source=pb.CorpusSource(builtin=pb.BuiltinCorpus(name="stdlib-docstrings", max_documents=20)),
        tokenizer_uri=uri, task=pb.DATASET_TASK_CAUSAL_LM, output_name="never"))),
    ("optimization", "model_uri", lambda pb, uri: ("SubmitOptimizationJob", pb.SubmitOptimizationJobRequest(
        model_uri=uri, steps=[pb.OptimizationStep(export=pb.ExportStep(format=pb.EXPORT_FORMAT_ONNX))],
        output_name="never"))),
    ("optimization", "eval_dataset_uri", lambda pb, uri: ("SubmitOptimizationJob", pb.SubmitOptimizationJobRequest(
        model_uri="artifact://models/gpt/1", eval_dataset_uri=uri,
        steps=[pb.OptimizationStep(export=pb.ExportStep(format=pb.EXPORT_FORMAT_ONNX))], output_name="never"))),
]


@pytest.fixture(scope="module")
def job_services(tmp_path_factory, redis_server, tiny_gpt):
    """The three job services on one home, with what the requests above need besides their missing URI: a
    causal-LM dataset `clm` and a GPT `gpt`."""
    from fastserve.runtime.config import Config
    from fastserve.runtime.stores import Stores
    from fastserve.services.preprocessing.core import Preprocessing
    from tests.conftest import private_env
    from tests.support.processes import start_service

    root = tmp_path_factory.mktemp("missing")
    env = private_env(root / "home", redis_server.url)
    stores = Stores.from_config(Config.from_env(env))
    source = {"builtin": {"name": "stdlib-docstrings", "max_documents": 200}}
    Preprocessing(stores).run_build_dataset({"source": source, "tokenizer_uri": "builtin://all-MiniLM-L6-v2",
                                             "task": "causal_lm", "max_length": 32, "output_name": "clm"})
    with stores.artifacts.publish("models", "gpt") as draft:
        for item in tiny_gpt.iterdir():
            shutil.copy(item, draft.path / item.name)
    procs = {name: start_service(name, env, root) for name in ("training", "preprocessing", "optimization")}
    yield procs, stores
    for proc in procs.values():
        proc.stop()


@pytest.mark.parametrize("service, field, request_of", MISSING_URIS, ids=[f"{s}-{f}" for s, f, _ in MISSING_URIS])
def test_a_uri_naming_nothing_is_not_found_with_its_field_in_every_service(job_services, service, field,
                                                                           request_of):
    """One rule at submit: a URI that names no artifact is NOT_FOUND naming the request field that carried it
    (training once said FAILED_PRECONDITION for a missing dataset); and the job is never queued."""
    import importlib

    import grpc

    procs, stores = job_services
    pb = importlib.import_module(f"fastserve.{service}.v1.{service}_pb2")
    grpc_module = importlib.import_module(f"fastserve.{service}.v1.{service}_pb2_grpc")
    kind = "tokenizers" if field == "tokenizer_uri" else "corpora" if field == "source.artifact_uri" else \
        "models" if field == "model_uri" else "datasets"
    method, request = request_of(pb, f"artifact://{kind}/nope/1")
    before = stores.jobs.list(service).total_size
    with grpc.insecure_channel(procs[service].target) as channel:
        stub = getattr(grpc_module, f"{service.capitalize()}ServiceStub")(channel)
        with pytest.raises(grpc.RpcError) as info:
            getattr(stub, method)(request, timeout=60)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND, info.value.details()
        assert info.value.details().startswith(f"no artifact {kind}/nope")
        assert field_of(info.value) == field
        if kind == "datasets":  # a published name close to the mistyped one is offered
            method, request = request_of(pb, "artifact://datasets/clmm/latest")
            with pytest.raises(grpc.RpcError) as info:
                getattr(stub, method)(request, timeout=60)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            assert "did you mean 'artifact://datasets/clm/latest'?" in info.value.details()
    assert stores.jobs.list(service).total_size == before


@pytest.mark.parametrize("name", ["a\n", "a\x00b", "a b", "", ".hidden", "x" * 129, "caf\u00e9"])
def test_a_name_is_letters_digits_and_dots_whole(name):
    """A final newline slips past a `$`-anchored pattern; the whole name must match."""
    from fastserve.storage.artifacts import check_name

    with pytest.raises(InvalidArgument) as info:
        check_name(name, "output_name")
    assert field_of(info.value) == "output_name"


# -- aliases ------------------------------------------------------------------------------------------

def test_an_alias_resolves_to_its_version_and_moves(store):
    first, second = _publish(store), _publish(store, text="again")
    assert store.set_alias("datasets", "tiny", "production", 1) is None
    found = store.resolve("artifact://datasets/tiny/production")
    assert found.ref == first.ref and found.ref.uri == "artifact://datasets/tiny/1"
    assert (found.path / "data.txt").read_text() == "hello"
    assert parse_uri("artifact://datasets/tiny/production").alias == "production"
    assert store.set_alias("datasets", "tiny", "production", 2) == 1
    assert store.resolve("artifact://datasets/tiny/production").ref == second.ref
    assert store.aliases("datasets", "tiny") == {"production": 2}
    # The alias file is beside the versions, never one of them.
    assert store.versions("datasets", "tiny") == [1, 2]
    assert [a.ref.uri for a in store.list("datasets")] == [first.ref.uri, second.ref.uri]
    assert store.set_alias("datasets", "tiny", "production", None) == 2
    with pytest.raises(NotFound) as info:
        store.resolve("artifact://datasets/tiny/production", field_name="model_uri")
    assert field_of(info.value) == "model_uri" and "no alias 'production'" in info.value.message
    assert store.set_alias("datasets", "tiny", "production", None) is None  # removing twice is no error


@pytest.mark.parametrize("alias", ["latest", "1a", "_a", "a" * 65, "a\n", "a.b", "", "caf\u00e9", "a b"])
def test_an_alias_name_is_checked_whole(store, alias):
    _publish(store)
    with pytest.raises(InvalidArgument) as info:
        store.set_alias("datasets", "tiny", alias, 1)
    assert field_of(info.value) == "alias_uri"
    assert store.aliases("datasets", "tiny") == {}


def test_an_alias_points_only_at_a_published_version(store):
    _publish(store)
    for version in (2, 0, -1):
        with pytest.raises(NotFound) as info:
            store.set_alias("datasets", "tiny", "prod", version)
        assert field_of(info.value) == "version"
    with pytest.raises(NotFound):
        store.set_alias("datasets", "nothing", "prod", 1)


def test_a_version_an_alias_points_at_is_not_deleted(store):
    from fastserve.runtime.errors import FailedPrecondition

    _publish(store)
    _publish(store)
    store.set_alias("datasets", "tiny", "prod", 1)
    store.set_alias("datasets", "tiny", "canary", 1)
    with pytest.raises(FailedPrecondition) as info:
        store.delete("datasets", "tiny", 1)
    assert "alias canary, prod points at artifact://datasets/tiny/1" in info.value.message
    assert store.versions("datasets", "tiny") == [1, 2]
    store.set_alias("datasets", "tiny", "prod", 2)
    store.set_alias("datasets", "tiny", "canary", None)
    store.delete("datasets", "tiny", 1)
    assert store.versions("datasets", "tiny") == [2]


def test_a_damaged_alias_file_reads_as_no_aliases(store):
    _publish(store)
    (store.root / "datasets" / "tiny" / ".aliases.json").write_text('{"prod": "1", "ok": 1, "1bad": 1')
    assert store.aliases("datasets", "tiny") == {}
    (store.root / "datasets" / "tiny" / ".aliases.json").write_text('{"prod": "1", "ok": 1, "1bad": 1, "z": 0}')
    assert store.aliases("datasets", "tiny") == {"ok": 1}


def _set_many(root: str, worker: int) -> None:
    store = ArtifactStore(root)
    for i in range(15):
        store.set_alias("datasets", "tiny", f"w{worker}-{i}", 1 + (i % 2))


def test_racing_alias_writers_lose_nothing_and_readers_see_old_or_new(store):
    """Writers in several processes each add their own aliases to one name; under the name's lock none
    overwrites another's. A reader meanwhile always resolves the moving alias to one of its versions."""
    import multiprocessing
    import threading

    _publish(store)
    _publish(store)
    store.set_alias("datasets", "tiny", "moving", 1)
    seen, stop = set(), threading.Event()

    def read() -> None:
        while not stop.is_set():
            seen.add(store.resolve("artifact://datasets/tiny/moving").ref.version)

    reader = threading.Thread(target=read)
    reader.start()
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_set_many, args=(str(store.root), w)) for w in range(4)]
    for w in writers:
        w.start()
    for i in range(60):
        store.set_alias("datasets", "tiny", "moving", 1 + i % 2)
    for w in writers:
        w.join(60)
        assert w.exitcode == 0
    stop.set()
    reader.join()
    aliases = store.aliases("datasets", "tiny")
    assert {a for a in aliases if a.startswith("w")} == {f"w{w}-{i}" for w in range(4) for i in range(15)}
    assert seen == {1, 2}
    assert not [p.name for p in (store.root / "datasets" / "tiny").iterdir() if p.name.startswith(".aliases-")]
