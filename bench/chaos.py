"""make chaos: faults a deployment meets, on a loopback stack, with the figures printed as RESULT lines.

1. Worker loss. Training jobs run on one Celery worker, which is SIGKILLed (its whole process group)
   CHAOS_KILLS times (default 20) at random points of running jobs, and started again each time. Every
   job must end SUCCEEDED with all its steps, going on from its last checkpoint rather than step 0.
   A job is killed at most (max attempts - 1) times: each kill costs it one attempt.
   Replacement workers boot ahead on a queue of their own and take the training queue when the
   worker dies, so the phase's time goes to the jobs and the leases' expiry.
2. Overload. An inference server with a queue of CHAOS_QUEUE requests (default 16) gets 4x that many
   concurrent Embed calls, several rounds: the excess must get RESOURCE_EXHAUSTED, the rest succeed,
   no other code, the server's resident memory stays bounded and the process alive.

Bounded in time: each phase has a deadline (CHAOS_DEADLINE_SECONDS, default 540 in all).
"""

from __future__ import annotations

import asyncio
import os
import random
import tempfile
import time
from collections import Counter
from pathlib import Path

import grpc
import psutil

from fastserve.inference.v1 import inference_pb2 as ipb
from fastserve.inference.v1 import inference_pb2_grpc
from fastserve.runtime.celery_app import client_app
from fastserve.runtime.config import SERVICES, Config
from fastserve.runtime.job_runner import max_attempts
from fastserve.runtime.jobs import EventType, JobState
from fastserve.runtime.redis_server import RedisServer
from fastserve.runtime.stores import Stores
from fastserve.services.preprocessing.core import Preprocessing
from fastserve.services.training.core import Training
from fastserve.services.training.servicer import request_params
from fastserve.training.v1 import training_pb2 as tpb
from tests.support.processes import Proc, free_port, start_inference, start_worker

KILLS = int(os.environ.get("CHAOS_KILLS", "20"))
QUEUE = int(os.environ.get("CHAOS_QUEUE", "16"))
DEADLINE = float(os.environ.get("CHAOS_DEADLINE_SECONDS", "540"))
STEPS, CHECKPOINT_EVERY = 100, 5
LEASE_SECONDS = 2


def _training_request(dataset_uri: str, i: int) -> tpb.SubmitTrainingJobRequest:
    return tpb.SubmitTrainingJobRequest(
        model=tpb.ModelSpec(architecture=tpb.ArchitectureConfig(
            family=tpb.ARCHITECTURE_FAMILY_GPT2, num_layers=2, hidden_size=64, num_heads=2)),
        task=tpb.TRAINING_TASK_CAUSAL_LM, dataset_uri=dataset_uri, output_name=f"chaos-{i}",
        hyperparameters=tpb.Hyperparameters(learning_rate=1e-3, batch_size=8, max_steps=STEPS,
                                            eval_interval_steps=STEPS, checkpoint_interval_steps=CHECKPOINT_EVERY,
                                            seed=i))


def _resumes(stores: Stores, job_id: str) -> list[tuple[int, int]]:
    """For each run after a lost worker: (the step of the last checkpoint before the loss, the first step
    the new run reported). A run that went on from its checkpoint reports a step past it."""
    runs, checkpoint, lost = [], 0, False
    # A finished job's stream ends with its terminal event, so this read ends.
    for event in stores.jobs.events(job_id):
        if event.type is EventType.ARTIFACT and "/checkpoints/" in event.data.get("uri", ""):
            checkpoint = int(event.data["uri"].rsplit("/", 1)[1])
        elif event.type is EventType.LOG and "queued again" in event.message:
            lost = True
        elif lost and event.type is EventType.METRICS and "step" in event.data:
            runs.append((checkpoint, int(event.data["step"])))
            lost = False
    return runs


def worker_loss(work: Path) -> None:
    redis = RedisServer(free_port(), work / "redis").start()
    env = {"FASTSERVE_HOME": str(work / "home"), "FASTSERVE_REDIS_URL": redis.url, "FASTSERVE_LOG_LEVEL": "WARNING",
           "FASTSERVE_JOB_LEASE_SECONDS": str(LEASE_SECONDS), "FASTSERVE_WORKER_CONCURRENCY": "1",
           **{f"FASTSERVE_{s.upper()}_METRICS_PORT": "0" for s in SERVICES}}
    stores = Stores.from_config(Config.from_env(env))
    logs = work / "logs"
    logs.mkdir()
    deadline = time.monotonic() + DEADLINE * 0.85
    pre = Preprocessing(stores)
    source = {"builtin": {"name": "stdlib-docstrings", "seed": 0}}
    tok = pre.run_train_tokenizer({"source": source, "model": "bpe", "vocab_size": 1000, "output_name": "bpe"})
    dataset = pre.run_build_dataset({"source": source, "tokenizer_uri": tok["tokenizer_uri"], "task": "causal_lm",
                                     "max_length": 64, "splits": {"validation_fraction": 0.02, "seed": 0},
                                     "output_name": "clm"})
    limit = max_attempts(stores)
    kills_per_job = limit - 1
    n_jobs = -(-KILLS // kills_per_job)
    training = Training(stores)
    jobs = [training.submit(request_params(_training_request(dataset["dataset_uri"], i))).job_id
            for i in range(n_jobs)]
    print(f"worker loss: {n_jobs} training jobs of {STEPS} steps (checkpoint every {CHECKPOINT_EVERY}), "
          f"{KILLS} SIGKILLs of the worker, lease {LEASE_SECONDS}s, {limit} attempts a job")
    rng = random.Random(0)
    killed: Counter[str] = Counter()
    progress_at_kill: dict[str, float] = {}
    control = client_app(stores.config).control

    def standby() -> Proc:
        # Booted ahead, on a queue of its own: the replacement takes the jobs the moment the worker dies,
        # so a kill costs the lease's expiry, not a worker's start.
        return start_worker(env, logs, include="fastserve.services.training.jobs", queues=("chaos-standby",))

    worker, spare = standby(), standby()
    control.add_consumer("training", destination=[worker.node], reply=True, timeout=10)
    try:
        while sum(killed.values()) < KILLS:
            if time.monotonic() > deadline:
                raise SystemExit(f"worker loss: deadline passed after {sum(killed.values())} kills")
            # A random point of a running job with kills left, past its first checkpoint and, if it was
            # killed before, past where its last run got to.
            target = rng.uniform(0.1, 0.7)
            victim = None
            while victim is None:
                if time.monotonic() > deadline:
                    raise SystemExit(f"worker loss: deadline passed after {sum(killed.values())} kills")
                for job_id in jobs:
                    job = stores.jobs.get(job_id)
                    if job.state is JobState.RUNNING and killed[job_id] < kills_per_job and job.progress >= target \
                            and job.progress > progress_at_kill.get(job_id, 0.0) + 0.05:
                        victim, progress_at_kill[job_id] = job_id, job.progress
                        break
                else:
                    if all(stores.jobs.get(j).state.terminal for j in jobs):
                        raise SystemExit(f"worker loss: every job ended after {sum(killed.values())} kills")
                    time.sleep(0.05)
            worker.kill()
            killed[victim] += 1
            worker = spare
            control.add_consumer("training", destination=[worker.node], reply=True, timeout=10)
            spare = standby()
        while not all(stores.jobs.get(j).state.terminal for j in jobs):
            if time.monotonic() > deadline:
                raise SystemExit("worker loss: jobs still running at the deadline")
            time.sleep(0.2)
    finally:
        worker.kill()
        spare.kill()
    states = Counter(stores.jobs.get(j).state.value for j in jobs)
    resumed: list[tuple[int, int]] = []
    for job_id in jobs:
        job = stores.jobs.get(job_id)
        steps = job.result.get("steps")
        firsts = _resumes(stores, job_id)
        resumed.extend(firsts)
        attempts = stores.jobs.redis.hget(stores.jobs.job_key(job_id), "attempts")
        went_on = ", ".join(f"checkpoint {c} -> step {f}" for c, f in firsts) or "-"
        print(f"  job {job_id[:8]}: {job.state.value}, killed {killed[job_id]}x, resumed: {went_on}; final step "
              f"{steps}, attempts {attempts}{', ' + job.error if job.error else ''}")
    lost = len(jobs) - states.get("SUCCEEDED", 0)
    # A run that did not go on from its checkpoint reports a step at or before it (from step 0: 1, 2, ...).
    not_continued = sum(1 for checkpoint, first in resumed if first <= checkpoint)
    redis.stop()
    print(f"RESULT chaos_worker_kills kills={sum(killed.values())} jobs={len(jobs)} "
          f"succeeded={states.get('SUCCEEDED', 0)} lost={lost} resumed_runs={len(resumed)} "
          f"not_continued_from_checkpoint={not_continued} "
          f"mean_resume_checkpoint_step={sum(c for c, _ in resumed) / max(len(resumed), 1):.1f}")


async def _round(target: str, n: int) -> Counter[str]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)

        async def one(i: int) -> str:
            try:
                await stub.Embed(ipb.EmbedRequest(model="minilm", texts=[f"sentence number {i} of the overload"]),
                                 timeout=60)
                return "OK"
            except grpc.aio.AioRpcError as error:
                return error.code().name

        return Counter(await asyncio.gather(*(one(i) for i in range(n))))


def overload(work: Path) -> None:
    server = start_inference(work / "inf-home", work / "inference.log", FASTSERVE_LOG_LEVEL="WARNING",
                             FASTSERVE_GRPC_THREADS=str(8 * QUEUE))
    try:
        with grpc.insecure_channel(server.target) as channel:
            inference_pb2_grpc.InferenceServiceStub(channel).LoadModel(ipb.LoadModelRequest(
                name="minilm", model_uri="builtin://all-MiniLM-L6-v2", config=ipb.ModelConfig(
                    batching=ipb.BatchingConfig(enabled=True, max_batch_size=8, max_queue_delay_us=20000,
                                                max_queue_size=QUEUE))), timeout=600)
        process = psutil.Process(server.process.pid)
        asyncio.run(_round(server.target, QUEUE))  # warm-up, within the queue
        baseline = process.memory_info().rss
        codes: Counter[str] = Counter()
        peak = baseline
        rounds = 10
        for _ in range(rounds):
            codes += asyncio.run(_round(server.target, 4 * QUEUE))
            peak = max(peak, process.memory_info().rss)
        alive = server.process.poll() is None
        final = process.memory_info().rss
    finally:
        server.stop()
    other = sum(v for k, v in codes.items() if k not in ("OK", "RESOURCE_EXHAUSTED"))
    print(f"overload: {rounds} rounds of {4 * QUEUE} concurrent Embed calls against a queue of {QUEUE}: "
          f"{dict(codes)}; RSS {baseline / 2**20:.0f} MiB before, peak {peak / 2**20:.0f} MiB, "
          f"after {final / 2**20:.0f} MiB; server alive: {alive}")
    print(f"RESULT chaos_overload calls={sum(codes.values())} ok={codes['OK']} "
          f"resource_exhausted={codes['RESOURCE_EXHAUSTED']} other={other} rss_baseline_mib={baseline / 2**20:.0f} "
          f"rss_peak_mib={peak / 2**20:.0f} rss_growth_mib={(peak - baseline) / 2**20:.0f} alive={alive}")


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="chaos-"))
    start = time.monotonic()
    worker_loss(work)
    overload(work)
    print(f"chaos: done in {time.monotonic() - start:.0f} s (logs under {work})")


if __name__ == "__main__":
    main()
