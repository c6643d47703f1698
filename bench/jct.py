"""make bench-jct: job completion time under MLFQ against FCFS, on the real engine over gRPC.

One inference server process serves the benchmark's GPT (bench/generation.py's, random weights) as two
models that differ only in their scheduling policy: the same batch size (JCT_BATCH), the same KV slots
(JCT_KV_SLOTS) and the same host pool, so MLFQ gains nothing from more cache than FCFS has.

The workload is heavy-tailed, as the FastServe paper's motivation: output lengths 8 * (1 + Pareto(1.1)),
capped at 900 tokens (half the requests want at most 15 tokens, about 1% over 700), prompts of 16 to 64
tokens. Requests arrive as a Poisson process at an offered load (0.8 and 1.0 by default) of the engine's
capacity at JCT_BATCH, which is measured first: a closed burst of FCFS requests that keeps every place of
every step busy. Each request's JCT is measured by its client, from sending to the reply.

A single run of a heavy-tailed workload swings widely (its few longest jobs decide its p99), so every load
runs several seeds (each a different workload and arrival sequence, the same for both policies), prints
each seed's figures, the median and the spread (min-max) of the ratios FCFS / MLFQ, and ends with RESULT
lines for the median seed (higher is better: MLFQ's JCT is the lower).

Knobs: BENCH_JCT_REQUESTS (requests per run, default 240), BENCH_JCT_SEEDS (default 3),
BENCH_JCT_LOADS (default "0.8,1.0").
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from bench.generation import MODEL_URI, closed_burst, publish_model, request
from bench.report import median_item, result_line, spread
from fastserve.inference.v1 import inference_pb2 as pb
from fastserve.inference.v1 import inference_pb2_grpc
from tests.support.processes import start_inference

REQUESTS = int(os.environ.get("BENCH_JCT_REQUESTS", "240"))
SEEDS = int(os.environ.get("BENCH_JCT_SEEDS", "3"))
LOADS = [float(v) for v in os.environ.get("BENCH_JCT_LOADS", "0.8,1.0").split(",")]
JCT_BATCH = 8
JCT_KV_SLOTS = 2 * JCT_BATCH  # MLFQ's default; FCFS gets the same
VOCAB = 8192
POLICIES = {"fcfs": pb.SCHEDULING_POLICY_FCFS, "mlfq": pb.SCHEDULING_POLICY_MLFQ}


def heavy_tailed(n: int, vocab: int, seed: int) -> list[tuple[list[int], int]]:
    rng = np.random.default_rng(seed)
    lengths = np.minimum((8 * (1 + rng.pareto(1.1, n))).astype(int), 900)
    return [(rng.integers(10, vocab, rng.integers(16, 65)).tolist(), int(m)) for m in lengths]


async def poisson(target: str, model: str, work: list[tuple[list[int], int]], rate: float,
                  seed: int) -> list[float]:
    """Requests arriving at `rate` per second (exponential gaps, seeded); each one's JCT in seconds."""
    gaps = np.random.default_rng(seed).exponential(1 / rate, len(work))
    async with grpc.aio.insecure_channel(target) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)

        async def one(prompt: list[int], n: int) -> float:
            start = time.perf_counter()
            await stub.Generate(request(model, prompt, n), timeout=900)
            return time.perf_counter() - start

        tasks, due = [], time.perf_counter()
        for (prompt, n), gap in zip(work, gaps, strict=True):
            due += gap  # absolute times, so that slow iterations of this loop do not stretch the arrivals
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            tasks.append(asyncio.create_task(one(prompt, n)))
        return list(await asyncio.gather(*tasks))


@dataclass
class Run:
    seed: int
    fcfs: np.ndarray
    mlfq: np.ndarray

    def mean_ratio(self) -> float:
        return self.fcfs.mean() / self.mlfq.mean()

    def p99_ratio(self) -> float:
        return np.percentile(self.fcfs, 99) / np.percentile(self.mlfq, 99)


def load_models(target: str) -> None:
    with grpc.insecure_channel(target) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        for policy, value in POLICIES.items():
            stub.LoadModel(pb.LoadModelRequest(name=f"jct-{policy}", model_uri=MODEL_URI, config=pb.ModelConfig(
                scheduling=value, generation=pb.GenerationConfig(kv_slots=JCT_KV_SLOTS),
                batching=pb.BatchingConfig(max_batch_size=JCT_BATCH, max_queue_size=4096))))


def capacity(target: str) -> float:
    """Tokens/s at JCT_BATCH with every place busy: a closed burst of 4 * JCT_BATCH equal requests."""
    work = heavy_tailed(JCT_BATCH * 4, VOCAB, seed=0)
    asyncio.run(closed_burst(target, "jct-fcfs", [(p, 16) for p, _ in work[:JCT_BATCH]]))  # warm-up
    seconds, tokens = asyncio.run(closed_burst(target, "jct-fcfs", [(p, 64) for p, _ in work]))
    return tokens / seconds


def main() -> None:
    work_dir = Path(tempfile.mkdtemp(prefix="bench-jct-"))
    publish_model(work_dir / "home")
    server = start_inference(work_dir / "home", work_dir / "inference.log", FASTSERVE_LOG_LEVEL="WARNING",
                             FASTSERVE_INFERENCE_MODELS="none")
    results: dict[float, list[Run]] = {}
    try:
        load_models(server.target)
        tokens_per_s = capacity(server.target)
        print(f"{os.cpu_count()} cores; GPT-2 4x256, vocab {VOCAB}, random weights; batch {JCT_BATCH}, "
              f"{JCT_KV_SLOTS} KV slots for both policies; capacity {tokens_per_s:.0f} tokens/s; "
              f"{REQUESTS} requests per run")
        for load in LOADS:
            results[load] = []
            for seed in range(SEEDS):
                work = heavy_tailed(REQUESTS, VOCAB, seed=1 + 100 * seed)
                rate = load * tokens_per_s / statistics.mean(n for _, n in work)
                # Alternate which policy goes first, so that a drift of the machine's speed favours neither.
                order = list(POLICIES) if seed % 2 == 0 else list(reversed(POLICIES))
                times = {policy: np.array(asyncio.run(poisson(server.target, f"jct-{policy}", work, rate,
                                                              seed=2 + 100 * seed)))
                         for policy in order}
                run = Run(seed, times["fcfs"], times["mlfq"])
                results[load].append(run)
                lengths = [n for _, n in work]
                print(f"load {load} seed {seed}: {rate:.1f} req/s, output tokens p50 {np.percentile(lengths, 50):.0f}"
                      f" max {max(lengths)}; " + "; ".join(
                          f"{p} mean {t.mean():.2f} s p50 {np.percentile(t, 50):.2f} s p99 {np.percentile(t, 99):.2f} s"
                          for p, t in sorted(times.items()))
                      + f"; ratio mean {run.mean_ratio():.2f} p99 {run.p99_ratio():.2f}", flush=True)
    finally:
        server.stop()

    for load, runs in results.items():
        print(f"load {load}: mean ratio {spread([r.mean_ratio() for r in runs])}; "
              f"p99 ratio {spread([r.p99_ratio() for r in runs])}")
    # fastserve = MLFQ, reference = FCFS, of the median seed; lower is better, so the ratio is FCFS / MLFQ.
    for load, runs in results.items():
        run = median_item(runs, Run.mean_ratio)
        print(result_line(f"mlfq-mean-jct-load{load}", run.mlfq.mean(), run.fcfs.mean(), "s",
                          higher_is_better=False) + f"  (seed {run.seed} of {len(runs)})")
        run = median_item(runs, Run.p99_ratio)
        print(result_line(f"mlfq-p99-jct-load{load}", np.percentile(run.mlfq, 99), np.percentile(run.fcfs, 99),
                          "s", higher_is_better=False) + f"  (seed {run.seed} of {len(runs)})")


if __name__ == "__main__":
    main()
