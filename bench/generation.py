"""make bench-generation: the generation engine against transformers on the same small GPT, in one run.

Throughput: 64 concurrent requests (prompts of 16 to 64 tokens, outputs of 8 to 256 tokens, uniform)
sent to one inference server process as gRPC calls from this process, against
- transformers `generate()` in static batches (left-padded; a batch runs until its longest request is
  done, and only each request's own tokens count), at batch 16, 32 and 64, keeping the best;
- transformers' own continuous batching (`generate_batch`'s manager, each request with its own
  max_new_tokens).

Job completion time: a heavy-tailed workload (output lengths 8 * (1 + Pareto(1.1)), capped at 900
tokens: half the requests want at most 15 tokens, 1% want over 700) arriving as a Poisson process at
the same offered load (BENCH_GEN_LOAD, default 1.0, of the engine's capacity at batch 8 measured
first) for FCFS and for MLFQ, each request's JCT measured by its client. MLFQ without the place it keeps
for the oldest sequence runs too, for information: it shows what that place does to the tail.

The model is a GPT-2 of 4 layers, 256 wide, vocabulary 8192 (the shape of the reference anchor),
at random weights: speed does not depend on their values. The device is chosen automatically.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from bench.report import result_line
from fastserve.inference.v1 import inference_pb2 as pb
from fastserve.inference.v1 import inference_pb2_grpc
from fastserve.storage.artifacts import ArtifactStore
from tests.support.processes import start_inference
from tests.support.tiny_models import build_causal_lm

REQUESTS = 64
JCT_REQUESTS = int(os.environ.get("BENCH_GEN_JCT_REQUESTS", "240"))
LOAD = float(os.environ.get("BENCH_GEN_LOAD", "1.0"))
JCT_BATCH = 8


def workload(n: int, vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = np.random.default_rng(seed)
    return [(rng.integers(10, vocab, rng.integers(16, 65)).tolist(), int(rng.integers(8, 257))) for _ in range(n)]


def heavy_tailed(n: int, vocab: int, seed: int = 1) -> list[tuple[list[int], int]]:
    rng = np.random.default_rng(seed)
    lengths = np.minimum((8 * (1 + rng.pareto(1.1, n))).astype(int), 900)
    return [(rng.integers(10, vocab, rng.integers(16, 65)).tolist(), int(m)) for m in lengths]


def request(model: str, prompt: list[int], n: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(model=model, token_ids=pb.TokenIds(ids=prompt),
                              sampling=pb.SamplingParams(max_new_tokens=n))


async def closed_burst(target: str, model: str, work: list[tuple[list[int], int]]) -> tuple[float, int]:
    """All requests at once, one client each; (seconds, generated tokens)."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        start = time.perf_counter()
        replies = await asyncio.gather(*(stub.Generate(request(model, p, n), timeout=600) for p, n in work))
        seconds = time.perf_counter() - start
    return seconds, sum(r.usage.completion_tokens for r in replies)


async def poisson(target: str, model: str, work: list[tuple[list[int], int]], rate: float) -> list[float]:
    """Requests arriving at `rate` per second (exponential gaps, seeded); each one's JCT in seconds."""
    gaps = np.random.default_rng(2).exponential(1 / rate, len(work))
    async with grpc.aio.insecure_channel(target) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)

        async def one(prompt: list[int], n: int) -> float:
            start = time.perf_counter()
            await stub.Generate(request(model, prompt, n), timeout=600)
            return time.perf_counter() - start

        tasks = []
        for (prompt, n), gap in zip(work, gaps, strict=True):
            await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(one(prompt, n)))
        return list(await asyncio.gather(*tasks))


def static_generate(model, work: list[tuple[list[int], int]], batch: int, device) -> float:
    """Useful tokens/s of generate() on static, left-padded batches in arrival order."""
    start, useful = time.perf_counter(), 0
    for i in range(0, len(work), batch):
        group = work[i:i + batch]
        width, longest = max(len(p) for p, _ in group), max(n for _, n in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (prompt, _) in enumerate(group):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        with torch.inference_mode():
            model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=longest,
                           min_new_tokens=longest, do_sample=False, pad_token_id=0)
        useful += sum(n for _, n in group)
    return useful / (time.perf_counter() - start)


def hf_continuous(model, work: list[tuple[list[int], int]]) -> float:
    """Tokens/s of transformers' continuous batching manager, each request with its own length."""
    config = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0,
                              max_new_tokens=max(n for _, n in work))
    start, tokens = time.perf_counter(), 0
    with model.continuous_batching_context_manager(generation_config=config) as manager:
        for prompt, n in work:
            manager.add_request(prompt, max_new_tokens=n)
        finished = 0
        while finished < len(work):
            result = manager.get_result(timeout=5)
            if result is not None and result.is_finished():
                finished += 1
                tokens += len(result.generated_tokens)
            elif result is None and not manager.is_running():
                raise RuntimeError("transformers' continuous batching stopped before finishing")
    return tokens / (time.perf_counter() - start)


MODEL_URI = "artifact://models/bench-gpt/1"


def publish_model(home: Path) -> Path:
    """The benchmark's GPT published as MODEL_URI in `home`'s artifact store; its folder. It has no
    end-of-sequence token, so every completion runs to its max_new_tokens."""
    store = ArtifactStore(home / "artifacts")
    with store.publish("models", "bench-gpt") as draft:
        build_causal_lm(draft.path, hidden=256, layers=4, heads=4, vocab=8192, positions=1024, train_steps=0,
                        documents=3000, eos=False)
    return store.resolve(MODEL_URI).path


def main() -> None:
    work_dir = Path(tempfile.mkdtemp(prefix="bench-gen-"))
    folder = publish_model(work_dir / "home")
    vocab = AutoConfig.from_pretrained(str(folder)).vocab_size
    work, tailed = workload(REQUESTS, vocab), heavy_tailed(JCT_REQUESTS, vocab)

    server = start_inference(work_dir / "home", work_dir / "inference.log", FASTSERVE_LOG_LEVEL="WARNING",
                             FASTSERVE_INFERENCE_MODELS="none")
    try:
        target = server.target
        with grpc.insecure_channel(target) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            for name, batch, policy, generation in (
                    ("gpt", REQUESTS, pb.SCHEDULING_POLICY_FCFS, None),
                    ("gpt-fcfs", JCT_BATCH, pb.SCHEDULING_POLICY_FCFS, None),
                    ("gpt-mlfq", JCT_BATCH, pb.SCHEDULING_POLICY_MLFQ, None),
                    ("gpt-mlfq-no-oldest-place", JCT_BATCH, pb.SCHEDULING_POLICY_MLFQ,
                     pb.GenerationConfig(mlfq_oldest_places=0))):
                stub.LoadModel(pb.LoadModelRequest(name=name, model_uri=MODEL_URI,
                                                   config=pb.ModelConfig(
                                                       scheduling=policy, generation=generation,
                                                       batching=pb.BatchingConfig(
                                                           max_batch_size=batch, max_queue_size=4096))))
        asyncio.run(closed_burst(target, "gpt", work[:16]))  # warm-up
        seconds, tokens = asyncio.run(closed_burst(target, "gpt", work))
        served = tokens / seconds
        # Capacity at the JCT batch size, then the same Poisson arrivals for both policies.
        calibration = [(p, 64) for p, _ in tailed[:JCT_BATCH * 2]]
        cal_seconds, cal_tokens = asyncio.run(closed_burst(target, "gpt-fcfs", calibration))
        mean_tokens = statistics.mean(n for _, n in tailed)
        rate = LOAD * (cal_tokens / cal_seconds) / mean_tokens
        jct = {policy: np.array(asyncio.run(poisson(target, f"gpt-{policy}", tailed, rate)))
               for policy in ("fcfs", "mlfq", "mlfq-no-oldest-place")}
    finally:
        server.stop()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(str(folder)).to(device).eval()
    static_generate(model, work[:8], 8, device)  # warm-up
    static = {batch: static_generate(model, work, batch, device) for batch in (16, 32, 64)}
    best_batch = max(static, key=static.get)
    continuous = hf_continuous(model, work)

    print(f"device {device.type}, {os.cpu_count()} cores; GPT-2 4x256, vocab {vocab}, random weights")
    print(f"throughput: {REQUESTS} requests, {tokens} tokens; service {served:.0f} tokens/s; generate() static "
          + ", ".join(f"batch {b}: {v:.0f}" for b, v in static.items()) + f"; generate_batch {continuous:.0f}")
    print(result_line("generation-vs-static", served, static[best_batch], "tokens/s")
          + f"  (reference: static batch {best_batch})")
    print(result_line("generation-vs-hf-continuous", served, continuous, "tokens/s"))
    lengths = [n for _, n in tailed]
    print(f"JCT: {JCT_REQUESTS} requests, output tokens p50 {np.percentile(lengths, 50):.0f}, p90 "
          f"{np.percentile(lengths, 90):.0f}, max {max(lengths)}; Poisson at {rate:.1f}/s = {LOAD:.0%} of "
          f"{cal_tokens / cal_seconds:.0f} tokens/s at batch {JCT_BATCH}")
    for policy, times in jct.items():
        print(f"  {policy}: mean {times.mean():.2f} s, p50 {np.percentile(times, 50):.2f} s, "
              f"p99 {np.percentile(times, 99):.2f} s")
    # fastserve = MLFQ, reference = FCFS; lower is better, so the ratio is FCFS / MLFQ.
    print(result_line("mlfq-mean-jct", jct["mlfq"].mean(), jct["fcfs"].mean(), "s", higher_is_better=False))
    print(result_line("mlfq-p99-jct", np.percentile(jct["mlfq"], 99), np.percentile(jct["fcfs"], 99), "s",
                      higher_is_better=False))


if __name__ == "__main__":
    main()
