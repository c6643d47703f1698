"""make bench-training: tokens/s of a training job through the service against a plain PyTorch loop.

The service side is a real local stack (gRPC service, Celery worker, Redis) running a job with its
events, cancel checks and checkpoints at the default interval; its tokens/s is the job's own count of
tokens over its training loop's wall time (model building and publishing excluded, and printed apart
end to end). The reference trains the same model on the same data in this process with a bare loop.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from bench.report import result_line
from fastserve.runtime.config import SERVICES, Config
from fastserve.runtime.redis_server import RedisServer
from fastserve.runtime.stores import Stores
from fastserve.services.preprocessing.core import Preprocessing
from fastserve.stack.processes import Stack
from fastserve.storage.datasets import DatasetReader
from fastserve.training.v1 import training_pb2 as pb
from fastserve.training.v1 import training_pb2_grpc
from tests.support.processes import free_port

STEPS = int(os.environ.get("BENCH_TRAINING_STEPS", "600"))
LAYERS, HIDDEN, HEADS, BLOCK, BATCH, LR = 4, 256, 4, 128, 16, 1e-3


def plain_loop(reader: DatasetReader, vocab: int) -> tuple[float, float]:
    """A bare PyTorch loop: same model, data order, optimizer and schedule length. Returns (tokens/s, loss)."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab, n_positions=1024, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS)
    model = AutoModelForCausalLM.from_config(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    data = reader.arrays("train")["input_ids"].astype(np.int64)
    order = np.random.default_rng([0, 0]).permutation(len(data))
    model.train()
    start = time.perf_counter()
    for step in range(STEPS):
        rows = order[(step * BATCH) % (len(order) - BATCH):][:BATCH]
        ids = torch.from_numpy(data[rows])
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - start
    return STEPS * BATCH * BLOCK / elapsed, float(loss)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    redis = RedisServer(free_port(), work / "redis").start()
    env = {"FASTSERVE_HOME": str(work / "home"), "FASTSERVE_REDIS_URL": redis.url, "FASTSERVE_LOG_LEVEL": "WARNING",
           **{f"FASTSERVE_{s.upper()}_PORT": str(free_port()) for s in SERVICES},
           **{f"FASTSERVE_{s.upper()}_METRICS_PORT": "0" for s in SERVICES}}
    config = Config.from_env(env)
    stores = Stores.from_config(config)
    pre = Preprocessing(stores)
    source = {"builtin": {"name": "stdlib-docstrings", "seed": 0}}
    tok = pre.run_train_tokenizer({"source": source, "model": "bpe", "vocab_size": 4000, "output_name": "bpe"})
    dataset = pre.run_build_dataset({"source": source, "tokenizer_uri": tok["tokenizer_uri"], "task": "causal_lm",
                                     "max_length": BLOCK, "splits": {"validation_fraction": 0.02, "seed": 0},
                                     "output_name": "clm"})
    artifact = stores.artifacts.resolve(dataset["dataset_uri"])
    reader = DatasetReader(artifact.path, artifact.manifest["metadata"])
    print(f"cores: {os.cpu_count()}, torch threads: {torch.get_num_threads()}; GPT-2 {LAYERS}x{HIDDEN}, "
          f"block {BLOCK}, batch {BATCH}, {STEPS} steps, {reader.rows('train')} training blocks")
    stack = Stack(config)
    stack.up()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{config.port('training')}") as channel:
            stub = training_pb2_grpc.TrainingServiceStub(channel)
            start = time.perf_counter()
            job = stub.SubmitTrainingJob(pb.SubmitTrainingJobRequest(
                model=pb.ModelSpec(architecture=pb.ArchitectureConfig(
                    family=pb.ARCHITECTURE_FAMILY_GPT2, num_layers=LAYERS, hidden_size=HIDDEN, num_heads=HEADS)),
                task=pb.TRAINING_TASK_CAUSAL_LM, dataset_uri=dataset["dataset_uri"], output_name="bench-gpt",
                hyperparameters=pb.Hyperparameters(learning_rate=LR, batch_size=BATCH, max_steps=STEPS,
                                                   eval_interval_steps=STEPS, seed=0))).job
            events = [r.event for r in stub.WatchJob(pb.WatchJobRequest(job_id=job.job_id), timeout=3600)]
            end_to_end = time.perf_counter() - start
            done = stub.GetJob(pb.GetJobRequest(job_id=job.job_id)).job
            if not done.result:
                raise SystemExit(f"job failed: {done.error}")
    finally:
        stack.down()
        redis.stop()
    m = done.result["metrics"]
    service_tps = m["run_tokens"] / m["train_seconds"]
    checkpoints = sum(1 for e in events if e.data and "uri" in e.data)
    print(f"service: {m['run_tokens']:.0f} tokens in {m['train_seconds']:.1f} s of training = {service_tps:.0f} "
          f"tokens/s; {len(events)} events, {checkpoints} checkpoints; end to end (submit to published model) "
          f"{end_to_end:.1f} s = {m['run_tokens'] / end_to_end:.0f} tokens/s; final loss {m['loss']:.3f}")
    plain_tps, plain_loss = plain_loop(reader, reader.info["vocab_size"])
    print(f"plain PyTorch loop: {plain_tps:.0f} tokens/s; final loss {plain_loss:.3f}")
    print(result_line("training-throughput", service_tps, plain_tps, "tokens/s"))


if __name__ == "__main__":
    main()
