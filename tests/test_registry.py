"""The artifact registry end to end: a real inference server process (which serves the registry), a real
preprocessing server and Celery worker whose jobs publish a tokenizer and a dataset, the tests' Redis for
the jobs a delete must respect, and the official client and the `fastserve` CLI on top."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from fastserve.client import ClientError, FastServeClient, sampling_params
from fastserve.client.channels import health_status
from fastserve.common.v1 import artifacts_pb2, jobs_pb2, pagination_pb2
from fastserve.preprocessing.v1 import preprocessing_pb2 as ppb
from fastserve.preprocessing.v1 import preprocessing_pb2_grpc
from fastserve.registry.v1 import registry_pb2 as pb
from fastserve.registry.v1 import registry_pb2_grpc
from fastserve.runtime.config import Config
from fastserve.runtime.jobs import JobState
from fastserve.runtime.stores import Stores
from fastserve.storage.artifacts import ArtifactStore
from tests.conftest import private_env
from tests.support.processes import free_port, spawn, start_service, start_worker, wait_serving
from tests.support.rpc import field_of

FASTSERVE = Path(sys.executable).with_name("fastserve")
S = jobs_pb2.JobState


def _copy_model(store: ArtifactStore, name: str, folder: Path, metadata: dict | None = None) -> str:
    with store.publish("models", name, metadata=metadata) as draft:
        for item in folder.iterdir():
            shutil.copy(item, draft.path / item.name)
    return draft.ref.uri


def _finish(stub, job) -> jobs_pb2.Job:
    for _ in stub.WatchJob(ppb.WatchJobRequest(job_id=job.job_id), timeout=300):
        pass
    final = stub.GetJob(ppb.GetJobRequest(job_id=job.job_id)).job
    assert final.state == S.JOB_STATE_SUCCEEDED, final.error
    return final


@pytest.fixture(scope="module")
def world(tmp_path_factory, redis_server, tiny_gpt):
    """The servers on one home and one Redis; a tokenizer and a dataset made by real preprocessing jobs, a
    trained and an optimized model published as their jobs publish them. The worker is stopped once its
    jobs are done, so that a job submitted later stays QUEUED."""
    root = tmp_path_factory.mktemp("registry")
    home, logs = root / "home", root / "logs"
    logs.mkdir()
    env = {**private_env(home, redis_server.url), "HF_HUB_OFFLINE": "1"}
    stores = Stores.from_config(Config.from_env(env))
    # The inference server starts (torch, transformers) while the jobs run.
    port = free_port()
    inference = spawn([sys.executable, "-m", "fastserve.services.inference"],
                      {**env, "FASTSERVE_INFERENCE_PORT": str(port), "FASTSERVE_INFERENCE_MODELS": "none"},
                      logs / "inference.log", port)
    pre = worker = None
    try:
        pre = start_service("preprocessing", env, logs)
        worker = start_worker(env, logs)
        channel = grpc.insecure_channel(pre.target)
        stub = preprocessing_pb2_grpc.PreprocessingServiceStub(channel)
        source = ppb.CorpusSource(builtin=ppb.BuiltinCorpus(name="stdlib-docstrings", max_documents=200))
        tok_job = _finish(stub, stub.TrainTokenizer(ppb.TrainTokenizerRequest(
            source=source, model=ppb.TOKENIZER_MODEL_BPE, vocab_size=300, output_name="tok")).job)
        ds_job = _finish(stub, stub.BuildDataset(ppb.BuildDatasetRequest(
            source=source, tokenizer_uri=tok_job.result["tokenizer_uri"], task=ppb.DATASET_TASK_CAUSAL_LM,
            max_length=32, output_name="ds")).job)
        worker.stop()
        worker = None
        wait_serving(inference, timeout=180)
        dataset_uri = ds_job.result["dataset_uri"]
        trained = _copy_model(stores.artifacts.owned_by("train-job-1"), "trained", tiny_gpt, {"model": {
            "task": "causal_lm", "family": "gpt2", "pretrained_uri": "", "dataset_uri": dataset_uri,
            "job_id": "train-job-1", "steps": 10}})
        report = {"job_id": "opt-job-1", "source_model_uri": trained, "steps": [{"quantize": {}}],
                  "relative_degradation": 0.01, "within_budget": True, "promoted": True}
        optimized = _copy_model(stores.artifacts.owned_by("opt-job-1"), "fast", tiny_gpt, {"optimization": report})
        with stores.artifacts.owned_by("opt-job-1").publish("reports", "optimization-opt-job-1", version=1) as draft:
            (draft.path / "report.json").write_text(json.dumps(report))
            draft.metadata["report"] = {**report, "result_uri": optimized}
        yield {"stores": stores, "pre": pre, "pre_stub": stub, "inference": inference, "channel": channel,
               "tok_job": tok_job, "ds_job": ds_job, "trained": trained, "optimized": optimized,
               "stub": registry_pb2_grpc.RegistryServiceStub(grpc.insecure_channel(inference.target))}
        channel.close()
    finally:
        for proc in (worker, inference, pre):
            if proc is not None:
                proc.stop()


@pytest.fixture
def fs(world):
    with FastServeClient(ports={"inference": world["inference"].port}) as client:
        yield client


@pytest.fixture
def cli(world, tmp_path):
    env = {**os.environ, "FASTSERVE_HOME": str(tmp_path / "cli-home"),
           "FASTSERVE_INFERENCE_PORT": str(world["inference"].port)}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(FASTSERVE), *args], env=env, capture_output=True, text=True, timeout=120)
    return run


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_registry_is_served_and_reported_healthy(world):
    with grpc.insecure_channel(world["inference"].target) as channel:
        assert health_status(channel, "fastserve.registry.v1.RegistryService", 5.0) == "SERVING"


def test_lineage_from_the_optimized_model_back_to_the_corpus(world, fs):
    tok_job, ds_job = world["tok_job"], world["ds_job"]
    tokenizer, dataset = tok_job.result["tokenizer_uri"], ds_job.result["dataset_uri"]
    store = world["stores"].artifacts
    corpus = store.resolve(dataset).manifest["metadata"]["dataset"]["corpus_uri"]
    trained, optimized = world["trained"], world["optimized"]
    report = "artifact://reports/optimization-opt-job-1/1"

    shown = fs.registry.show(optimized)
    assert shown.source == "job opt-job-1"
    assert [(e.uri, e.relation, e.input_uri, e.job_id) for e in shown.lineage] == [
        (optimized, "source_model", trained, "opt-job-1"),
        (optimized, "report", report, "opt-job-1"),
        (trained, "dataset", dataset, "train-job-1"),
        (report, "source_model", trained, "opt-job-1"),
        (dataset, "corpus", corpus, ds_job.job_id),
        (dataset, "tokenizer", tokenizer, ds_job.job_id),
        (tokenizer, "trained_on", corpus, tok_job.job_id),
    ]
    # The dataset's own lineage, as its job recorded it.
    ds = fs.registry.show(dataset)
    assert [(e.relation, e.input_uri, e.job_id) for e in ds.lineage] == [
        ("corpus", corpus, ds_job.job_id), ("tokenizer", tokenizer, ds_job.job_id),
        ("trained_on", corpus, tok_job.job_id)]
    assert ds.source == f"job {ds_job.job_id}" and ds.metadata["dataset"]["tokenizer_uri"] == tokenizer
    assert fs.registry.show(corpus).lineage == []


def test_list_and_show_report_files_sizes_and_sources(world, fs):
    store = world["stores"].artifacts
    summaries = list(fs.registry.list())
    uris = [s.ref.uri for s in summaries]
    assert world["trained"] in uris and world["optimized"] in uris and world["ds_job"].result["dataset_uri"] in uris
    kinds = [s.ref.kind for s in summaries]
    assert kinds == sorted(kinds)  # by kind, in the store's order (which the enum follows)
    models = list(fs.registry.list("models"))
    assert {s.ref.kind for s in models} == {artifacts_pb2.ARTIFACT_KIND_MODEL}
    trained = next(s for s in models if s.ref.uri == world["trained"])
    folder = store.resolve(world["trained"]).path
    on_disk = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert trained.size_bytes == on_disk and trained.source == "job train-job-1"
    assert trained.create_time.seconds > 0 and trained.ref.version == 1 and trained.ref.name == "trained"
    assert [s.ref.uri for s in fs.registry.list(name="trained")] == [world["trained"]]

    shown = fs.registry.show("artifact://models/trained/latest")
    assert shown.artifact.ref.uri == world["trained"] and shown.artifact.size_bytes == on_disk
    files = {f.path: f for f in shown.artifact.files}
    assert set(files) == {p.name for p in folder.iterdir() if p.name != "manifest.json"}
    assert files["config.json"].sha256 == _sha256(folder / "config.json")
    assert files["config.json"].size_bytes == (folder / "config.json").stat().st_size
    assert shown.metadata["model"]["dataset_uri"] == world["ds_job"].result["dataset_uri"]


def test_paging_walks_every_version_once_and_bounds_its_size(world):
    store, stub = world["stores"].artifacts, world["stub"]
    names = [f"bulk-{i:04d}" for i in range(1003)]
    for name in names:  # one version each: a name's next version number is found by listing its versions
        with store.publish("checkpoints", name) as draft:
            (draft.path / "step.txt").write_text("x")

    def page(size, token=""):
        return stub.ListArtifacts(pb.ListArtifactsRequest(kind=artifacts_pb2.ARTIFACT_KIND_CHECKPOINT,
                                                          page=pagination_pb2.PageRequest(page_size=size,
                                                                                          page_token=token)),
                                  timeout=60)

    default = page(0)
    assert len(default.artifacts) == 50 and default.page.total_size == 1003 and default.page.next_page_token
    clamped = page(5000)
    assert len(clamped.artifacts) == 1000 and clamped.page.next_page_token
    rest = page(5000, clamped.page.next_page_token)
    assert [a.ref.name for a in rest.artifacts] == names[1000:] and not rest.page.next_page_token
    walked, token = [], ""
    while True:
        reply = page(400, token)
        walked += [a.ref.name for a in reply.artifacts]
        token = reply.page.next_page_token
        if not token:
            break
    assert walked == names
    for size, token, field in [(-1, "", "page.page_size"), (10, "bogus", "page.page_token"),
                               (10, "WyJtb2RlbHMiLCAiYSIsICJ4Il0=", "page.page_token")]:
        with pytest.raises(grpc.RpcError) as info:
            page(size, token)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field_of(info.value) == field


def test_an_alias_moves_while_a_model_serves_its_old_version(world, fs, tiny_gpt):
    store = world["stores"].artifacts
    first = _copy_model(store, "served", tiny_gpt)
    second = _copy_model(store, "served", tiny_gpt)
    moved = fs.registry.set_alias("artifact://models/served/production", 1)
    assert moved.ref.uri == first and moved.previous_version == 0

    status = fs.inference.load_model("x", "artifact://models/served/production")
    assert status.model_uri == first
    moved = fs.registry.set_alias("artifact://models/served/production", 2)
    assert moved.ref.uri == second and moved.previous_version == 1
    # The served model keeps serving the version it loaded; a new load gets the new one.
    reply = fs.inference.generate("x", "hello", sampling_params(max_new_tokens=3))
    assert reply.usage.completion_tokens == 3
    assert fs.inference.model_status("x").model_uri == first
    assert fs.inference.load_model("y", "artifact://models/served/production").model_uri == second
    assert fs.registry.show("artifact://models/served/production").artifact.ref.uri == second
    assert list(fs.registry.show(second).aliases) == ["production"]
    assert [list(s.aliases) for s in fs.registry.list("models", "served")] == [[], ["production"]]

    # Deletes: refused while served (naming the model), while an alias points (naming it), then done.
    with pytest.raises(ClientError) as info:
        fs.registry.delete(first)
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "model x version 1 serves" in info.value.message and "unload it first" in info.value.message
    fs.inference.unload_model("x")
    assert fs.registry.delete(first).uri == first
    assert store.versions("models", "served") == [2]
    fs.inference.unload_model("y")
    with pytest.raises(ClientError) as info:
        fs.registry.delete(second)
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION and "alias production" in info.value.message
    removed = fs.registry.set_alias("artifact://models/served/production", 0)
    assert removed.previous_version == 2 and not removed.ref.uri
    fs.registry.delete(second)
    with pytest.raises(ClientError) as info:
        fs.registry.show(second)
    assert info.value.code == grpc.StatusCode.NOT_FOUND


def test_a_delete_waits_for_the_unfinished_jobs_that_use_it(world, fs, tiny_gpt):
    store, jobs = world["stores"].artifacts, world["stores"].jobs
    tokenizer = world["tok_job"].result["tokenizer_uri"]
    with store.publish("tokenizers", "tok-copy") as draft:
        for item in store.resolve(tokenizer).path.iterdir():
            if item.name != "manifest.json":
                shutil.copy(item, draft.path / item.name)
    # Submitted through the service with no worker running: it stays QUEUED, naming the copy as `latest`.
    queued = world["pre_stub"].BuildDataset(ppb.BuildDatasetRequest(
        source=ppb.CorpusSource(builtin=ppb.BuiltinCorpus(name="stdlib-docstrings", max_documents=200)),
        tokenizer_uri="artifact://tokenizers/tok-copy/latest", task=ppb.DATASET_TASK_CAUSAL_LM,
        output_name="never")).job
    with pytest.raises(ClientError) as info:
        fs.registry.delete(draft.ref.uri)
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert f"job {queued.job_id} (preprocessing, QUEUED) uses" in info.value.message
    world["pre_stub"].CancelJob(ppb.CancelJobRequest(job_id=queued.job_id))
    assert fs.registry.delete(draft.ref.uri).uri == draft.ref.uri

    # A running training job that names the model deep in its params.
    held = _copy_model(store, "held", tiny_gpt)
    job = jobs.create("training", "training.train", {"model": {"pretrained_uri": "artifact://models/held/1"},
                                                     "output_name": "next"})
    jobs.transition(job.job_id, JobState.RUNNING)
    with pytest.raises(ClientError) as info:
        fs.registry.delete(held)
    assert f"job {job.job_id} (training, RUNNING) uses" in info.value.message
    jobs.transition(job.job_id, JobState.SUCCEEDED)
    fs.registry.delete(held)


def test_download_gives_back_the_files(world, fs, tmp_path, cli):
    store = world["stores"].artifacts
    artifact = store.resolve(world["optimized"])
    big = _big_model(store, tmp_path)
    for uri in (world["optimized"], big):
        source = store.resolve(uri)
        dest = fs.registry.download(uri, tmp_path / "down" / source.ref.name)
        expected = {f["path"]: f["sha256"] for f in source.manifest["files"]}
        got = {p.relative_to(dest).as_posix(): _sha256(p) for p in dest.rglob("*") if p.is_file()}
        assert got == expected
    assert not [p for p in (tmp_path / "down").iterdir() if p.name.startswith(".")]  # nothing left aside
    with pytest.raises(FileExistsError):
        fs.registry.download(world["optimized"], tmp_path / "down" / "fast")

    result = cli("artifacts", "download", "artifact://models/fast/latest", str(tmp_path / "cli-down"))
    assert result.returncode == 0, result.stderr
    assert f"{len(artifact.manifest['files'])} files" in result.stdout
    assert _sha256(tmp_path / "cli-down" / "config.json") == _sha256(artifact.path / "config.json")
    again = cli("artifacts", "download", "artifact://models/fast/latest", str(tmp_path / "cli-down"))
    assert again.returncode == 2 and "exists" in again.stderr


def _big_model(store: ArtifactStore, tmp_path: Path) -> str:
    """A version with a file of several chunks (1 MiB each) and one in a subfolder."""
    with store.publish("models", "chunky") as draft:
        (draft.path / "weights.bin").write_bytes(os.urandom(3 * (1 << 20) + 17))
        (draft.path / "sub").mkdir()
        (draft.path / "sub" / "empty.txt").write_bytes(b"")
    return draft.ref.uri


def test_the_download_stream_has_headers_then_chunks_of_at_most_a_mib(world):
    uri = "artifact://models/chunky/latest"
    if not world["stores"].artifacts.versions("models", "chunky"):
        _big_model(world["stores"].artifacts, Path())
    parts = list(world["stub"].DownloadArtifact(pb.DownloadArtifactRequest(uri=uri), timeout=60))
    kinds = [p.WhichOneof("part") for p in parts]
    assert kinds[0] == "file" and kinds.count("file") == 2
    chunks = [p.chunk for p in parts if p.WhichOneof("part") == "chunk"]
    assert all(len(c.data) <= 1 << 20 for c in chunks) and len(chunks) == 4
    assert [c.offset for c in chunks] == [0, 1 << 20, 2 << 20, 3 << 20]


@pytest.mark.parametrize("rpc, request_, code, field", [
    ("GetArtifact", pb.GetArtifactRequest(uri="models/x/1"), "INVALID_ARGUMENT", "uri"),
    ("GetArtifact", pb.GetArtifactRequest(uri="artifact://models/x/1.5"), "INVALID_ARGUMENT", "uri"),
    ("GetArtifact", pb.GetArtifactRequest(uri="artifact://models/trained/nosuchalias"), "NOT_FOUND", "uri"),
    ("GetArtifact", pb.GetArtifactRequest(uri="artifact://models/nothing/1"), "NOT_FOUND", "uri"),
    ("DeleteArtifact", pb.DeleteArtifactRequest(uri="artifact://models/trained/latest"), "INVALID_ARGUMENT", "uri"),
    ("DeleteArtifact", pb.DeleteArtifactRequest(uri="artifact://models/trained/prod"), "INVALID_ARGUMENT", "uri"),
    ("DeleteArtifact", pb.DeleteArtifactRequest(uri=""), "INVALID_ARGUMENT", "uri"),
    ("SetAlias", pb.SetAliasRequest(alias_uri="artifact://models/trained/1", version=1), "INVALID_ARGUMENT",
     "alias_uri"),
    ("SetAlias", pb.SetAliasRequest(alias_uri="artifact://models/trained/latest", version=1), "INVALID_ARGUMENT",
     "alias_uri"),
    ("SetAlias", pb.SetAliasRequest(alias_uri="artifact://models/trained/bad.alias", version=1),
     "INVALID_ARGUMENT", "alias_uri"),
    ("SetAlias", pb.SetAliasRequest(alias_uri="artifact://models/trained/" + "a" * 65, version=1),
     "INVALID_ARGUMENT", "alias_uri"),
    ("SetAlias", pb.SetAliasRequest(alias_uri="artifact://models/trained/prod", version=-1), "INVALID_ARGUMENT",
     "version"),
    ("SetAlias", pb.SetAliasRequest(alias_uri="artifact://models/trained/prod", version=99), "NOT_FOUND",
     "version"),
    ("ListArtifacts", pb.ListArtifactsRequest(kind=99), "INVALID_ARGUMENT", "kind"),
    ("ListArtifacts", pb.ListArtifactsRequest(name="a b"), "INVALID_ARGUMENT", "name"),
])
def test_bad_requests_name_their_field(world, rpc, request_, code, field):
    with pytest.raises(grpc.RpcError) as info:
        getattr(world["stub"], rpc)(request_, timeout=30)
    assert info.value.code() == getattr(grpc.StatusCode, code) and field_of(info.value) == field


def test_a_bad_download_uri_is_invalid_argument(world):
    with pytest.raises(grpc.RpcError) as info:
        list(world["stub"].DownloadArtifact(pb.DownloadArtifactRequest(uri="artifact://models/../1"), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field_of(info.value) == "uri"


def test_the_cli_lists_shows_aliases_and_deletes(world, cli, tiny_gpt):
    store = world["stores"].artifacts
    uri = _copy_model(store, "cli-model", tiny_gpt)
    listed = cli("artifacts", "list", "--kind", "models", "--wide")
    assert listed.returncode == 0, listed.stderr
    assert uri in listed.stdout and "job train-job-1" in listed.stdout
    assert "artifact://checkpoints" not in listed.stdout
    as_json = json.loads(cli("artifacts", "list", "--name", "cli-model", "--json").stdout)
    assert [a["ref"]["uri"] for a in as_json] == [uri]

    shown = json.loads(cli("artifacts", "show", world["optimized"], "--json").stdout)
    assert shown["lineage"][0]["relation"] == "source_model" and shown["source"] == "job opt-job-1"
    table = cli("artifacts", "show", world["optimized"], "--wide")
    assert table.returncode == 0 and "config.json" in table.stdout and "trained_on" in table.stdout

    aliased = cli("artifacts", "alias", "artifact://models/cli-model/stable", "1")
    assert aliased.returncode == 0, aliased.stderr
    assert aliased.stdout.strip() == f"artifact://models/cli-model/stable -> {uri} (new)"
    refused = cli("artifacts", "rm", uri)
    assert refused.returncode == 1 and refused.stderr.startswith("FAILED_PRECONDITION: alias stable")
    assert "Traceback" not in refused.stderr
    bad = cli("artifacts", "alias", "artifact://models/cli-model/1", "1")
    assert bad.returncode == 1 and "(argument uri)" in bad.stderr
    assert cli("artifacts", "alias", "artifact://models/cli-model/stable").returncode == 2
    assert cli("artifacts", "alias", "artifact://models/cli-model/stable", "--remove").returncode == 0
    removed = cli("artifacts", "rm", uri)
    assert removed.returncode == 0 and removed.stdout.strip() == f"deleted {uri}"
    assert store.versions("models", "cli-model") == []


def test_an_imported_model_shows_its_source(world, fs, tiny_gpt):
    reply = fs.registry.import_model(tiny_gpt, "imported")
    shown = fs.registry.show(reply.artifact.ref.uri)
    assert shown.source == "import" and list(shown.lineage) == []
    assert {f.path for f in shown.artifact.files} >= {"config.json", "model.safetensors"}
    assert next(s for s in fs.registry.list("models", "imported")).source == "import"
