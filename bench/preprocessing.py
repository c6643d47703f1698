"""make bench-preprocessing: tokenize-and-shard throughput of the running service against calling
tokenizers' `encode_batch` directly in one process, on the same corpus, both on every core.

The service side is a whole BuildDataset job (causal LM, 512-token blocks) through a real local stack
(gRPC service, Celery worker, Redis): read the corpus, tokenize, pack, write shards, publish. The
reference holds the same texts in memory and only calls `encode_batch`. The worker's peak RSS is
sampled at two corpus sizes to show that memory stays flat as the corpus grows.

Environment: BENCH_PREPROCESSING_MB (default 100) sets the large corpus size.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from pathlib import Path

import grpc
import psutil

from bench.report import result_line
from fastserve.common.v1 import jobs_pb2
from fastserve.corpora.stdlib import stdlib_documents
from fastserve.models.tokenizers import load_tokenizer
from fastserve.preprocessing.v1 import preprocessing_pb2 as pb
from fastserve.preprocessing.v1 import preprocessing_pb2_grpc
from fastserve.runtime.config import SERVICES, Config
from fastserve.runtime.redis_server import RedisServer
from fastserve.runtime.stores import Stores
from fastserve.stack.processes import Stack
from tests.support.processes import free_port

CHUNK = 1 << 20


def write_corpus(path: Path, target_mb: float) -> int:
    """JSONL of stdlib docstrings, repeated with a pass number until `target_mb` MB of text."""
    docs = stdlib_documents(seed=0)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        rep = 0
        while written < target_mb * 1e6:
            for doc in docs:
                text = f"[{rep}] {doc['text']}"
                f.write(json.dumps({"text": text}) + "\n")
                written += len(text.encode())
            rep += 1
    return written


def upload(stub, name: str, path: Path) -> str:
    def messages():
        yield pb.UploadCorpusRequest(header=pb.UploadCorpusHeader(name=name, format=pb.TEXT_FORMAT_JSONL))
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                yield pb.UploadCorpusRequest(chunk=chunk)
    return stub.UploadCorpus(messages(), timeout=3600).corpus.uri


class PeakRss:
    """Samples the peak RSS of a process tree's children (the Celery pool process that runs jobs)."""

    def __init__(self, pid: int) -> None:
        self.root, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for child in self.root.children(recursive=True):
                try:
                    self.peak = max(self.peak, child.memory_info().rss)
                except psutil.Error:
                    pass
            time.sleep(0.05)

    def __enter__(self) -> PeakRss:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.thread.join()


def run_job(stub, request) -> tuple[float, dict]:
    start = time.perf_counter()
    job = stub.BuildDataset(request).job
    for _ in stub.WatchJob(pb.WatchJobRequest(job_id=job.job_id), timeout=3600):
        pass
    elapsed = time.perf_counter() - start
    final = stub.GetJob(pb.GetJobRequest(job_id=job.job_id)).job
    if final.state != jobs_pb2.JOB_STATE_SUCCEEDED:
        raise SystemExit(f"job failed: {final.error}")
    return elapsed, dict(final.result)


def main() -> None:
    big_mb = float(os.environ.get("BENCH_PREPROCESSING_MB", "100"))
    work = Path(tempfile.mkdtemp(prefix="bench-pre-"))
    redis = RedisServer(free_port(), work / "redis").start()
    env = {"FASTSERVE_HOME": str(work / "home"), "FASTSERVE_REDIS_URL": redis.url, "FASTSERVE_LOG_LEVEL": "WARNING",
           **{f"FASTSERVE_{s.upper()}_PORT": str(free_port()) for s in SERVICES},
           **{f"FASTSERVE_{s.upper()}_METRICS_PORT": "0" for s in SERVICES}}
    config = Config.from_env(env)
    stack = Stack(config)
    print(f"cores: {os.cpu_count()}; corpus sizes: {big_mb / 2:.0f} MB and {big_mb:.0f} MB of text")
    stack.up()
    try:
        worker = next(c for c in stack.components() if c.name == "worker")
        channel = grpc.insecure_channel(f"127.0.0.1:{config.port('preprocessing')}",
                                        options=[("grpc.max_receive_message_length", 64 << 20)])
        stub = preprocessing_pb2_grpc.PreprocessingServiceStub(channel)
        tok_job = stub.TrainTokenizer(pb.TrainTokenizerRequest(
            source=pb.CorpusSource(builtin=pb.BuiltinCorpus(name="stdlib-docstrings")), model=pb.TOKENIZER_MODEL_BPE,
            vocab_size=8000, output_name="bench-bpe")).job
        for _ in stub.WatchJob(pb.WatchJobRequest(job_id=tok_job.job_id)):
            pass
        tokenizer_uri = stub.GetJob(pb.GetJobRequest(job_id=tok_job.job_id)).job.result["tokenizer_uri"]
        stores = Stores.from_config(config)

        measured = {}
        for label, mb in (("half", big_mb / 2), ("full", big_mb)):
            path = work / f"corpus-{label}.jsonl"
            text_bytes = write_corpus(path, mb)
            start = time.perf_counter()
            corpus_uri = upload(stub, f"bench-{label}", path)
            upload_s = time.perf_counter() - start
            request = pb.BuildDatasetRequest(source=pb.CorpusSource(artifact_uri=corpus_uri),
                                             tokenizer_uri=tokenizer_uri, task=pb.DATASET_TASK_CAUSAL_LM,
                                             max_length=512, splits=pb.Splits(validation_fraction=0.01),
                                             output_name=f"bench-{label}")
            with PeakRss(worker.pid) as rss:
                elapsed, result = run_job(stub, request)
            measured[label] = (text_bytes, elapsed, rss.peak, result)
            print(f"service {label}: {text_bytes / 1e6:.1f} MB text, upload {text_bytes / 1e6 / upload_s:.1f} MB/s, "
                  f"build {elapsed:.1f} s = {text_bytes / 1e6 / elapsed:.2f} MB/s, {int(result['tokens'])} tokens, "
                  f"worker peak RSS {rss.peak / 2**20:.0f} MiB")

        text_bytes, service_s, _, _ = measured["full"]
        corpus_path = stores.artifacts.resolve("artifact://corpora/bench-full/latest").path / "documents.jsonl"
        texts = [json.loads(line)["text"] for line in open(corpus_path, encoding="utf-8")]
        tok = load_tokenizer(stores.artifacts.resolve(tokenizer_uri).path)
        start = time.perf_counter()
        tokens = 0
        for i in range(0, len(texts), 2048):
            tokens += sum(len(e.ids) for e in tok.encode_batch(texts[i:i + 2048], add_special_tokens=False))
        direct_s = time.perf_counter() - start
        direct_rss = psutil.Process().memory_info().rss
        print(f"direct encode_batch: {direct_s:.1f} s = {text_bytes / 1e6 / direct_s:.2f} MB/s, {tokens} tokens, "
              f"process RSS {direct_rss / 2**20:.0f} MiB (corpus held in memory)")
        print(result_line("preprocessing-throughput", text_bytes / 1e6 / service_s, text_bytes / 1e6 / direct_s,
                          "MB/s"))
        half, full = measured["half"][2], measured["full"][2]
        print(f"worker peak RSS: {half / 2**20:.0f} MiB at {measured['half'][0] / 1e6:.0f} MB, "
              f"{full / 2**20:.0f} MiB at {measured['full'][0] / 1e6:.0f} MB (x{full / half:.2f} for x2 corpus)")
        channel.close()
    finally:
        stack.down()
        redis.stop()


if __name__ == "__main__":
    main()
