"""make bench-inference: all-MiniLM-L6-v2 embeddings served to 32 concurrent clients, each sending one
sentence at a time, against the same model batched in-process at its best batch size.

One inference server process serves the model twice: with dynamic batching (batches of up to
BENCH_INFERENCE_BATCH inputs, default 32, one per client), and with batching off.
The clients are asyncio gRPC calls from this process (one sentence each, 8 to 24 words). The
reference runs transformers in this process, tokenizing and pooling inside the timed loop, at batch
sizes 1 to 64, and keeps its best. The device is chosen automatically (CUDA when present).

Environment: BENCH_INFERENCE_REQUESTS (default 1600 per phase) sets the load.
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
from transformers import AutoModel, AutoTokenizer

from bench.report import result_line
from fastserve.inference.v1 import inference_pb2 as pb
from fastserve.inference.v1 import inference_pb2_grpc
from fastserve.models.refs import BUILTIN_MODELS
from tests.support.processes import start_inference

CLIENTS = 32
BATCH = int(os.environ.get("BENCH_INFERENCE_BATCH", "32"))
REQUESTS = int(os.environ.get("BENCH_INFERENCE_REQUESTS", "1600"))
MODEL = "all-MiniLM-L6-v2"
WORDS = "the quick brown fox jumps over the lazy dog while serving language models at scale".split()


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(8, 24))) for _ in range(n)]


async def load_phase(target: str, model: str, texts: list[str]) -> tuple[float, list[float]]:
    """32 clients, one sentence per call, until `texts` are all sent; (sentences/s, latencies in ms)."""
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        queue = list(reversed(texts))

        async def client() -> None:
            while queue:
                text = queue.pop()
                start = time.perf_counter()
                await stub.Embed(pb.EmbedRequest(model=model, texts=[text]), timeout=60)
                latencies.append((time.perf_counter() - start) * 1e3)

        await asyncio.gather(*(client() for _ in range(CLIENTS // 2)))  # warm-up at half load
        queue.extend(reversed(texts))
        latencies.clear()
        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(CLIENTS)))
        elapsed = time.perf_counter() - start
    return len(texts) / elapsed, latencies


def in_process(texts: list[str]) -> tuple[int, float, dict[int, float]]:
    """The same model batched in this process: best (batch size, sentences/s), and all figures."""
    path = str(BUILTIN_MODELS[MODEL]())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).to(device).eval()

    def run(batch: int, n: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, n, batch):
                enc = tokenizer(texts[i:i + batch], padding=True, truncation=True, max_length=256,
                                return_tensors="pt").to(device)
                hidden = model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).float()
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                torch.nn.functional.normalize(pooled, dim=1).cpu()
        return n / (time.perf_counter() - start)

    figures = {}
    for batch in (1, 8, 16, 32, 64):
        run(batch, 64)
        figures[batch] = statistics.median(run(batch, 512) for _ in range(3))
    best = max(figures, key=figures.get)
    return best, figures[best], figures


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-inf-"))
    server = start_inference(work / "home", work / "inference.log", FASTSERVE_LOG_LEVEL="WARNING")
    try:
        target = server.target
        with grpc.insecure_channel(target) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            stub.LoadModel(pb.LoadModelRequest(name=f"{MODEL}-unbatched", model_uri=f"builtin://{MODEL}",
                                               config=pb.ModelConfig(batching=pb.BatchingConfig(enabled=False))))
            # The served model as a user would tune it for this load: batches up to the number of clients.
            stub.LoadModel(pb.LoadModelRequest(name=f"{MODEL}-batched", model_uri=f"builtin://{MODEL}",
                                               config=pb.ModelConfig(batching=pb.BatchingConfig(
                                                   enabled=True, max_batch_size=BATCH, max_queue_delay_us=20000))))
        texts = sentences(REQUESTS)
        batched, batched_lat = asyncio.run(load_phase(target, f"{MODEL}-batched", texts))
        unbatched, unbatched_lat = asyncio.run(load_phase(target, f"{MODEL}-unbatched", texts))
        with grpc.insecure_channel(target) as channel:
            stats = inference_pb2_grpc.InferenceServiceStub(channel).GetModelStatistics(
                pb.GetModelStatisticsRequest(name=f"{MODEL}-batched")).stats[0]
    finally:
        server.stop()
    best_batch, best, figures = in_process(sentences(512, seed=1))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device {device}, {os.cpu_count()} cores, {CLIENTS} clients x 1 sentence, {REQUESTS} requests per phase")
    print("in-process batched: " + ", ".join(f"batch {b}: {v:.0f}/s" for b, v in figures.items()))
    mean_batch = stats.inference_count / stats.batch_count
    print(f"served with batching (max batch {BATCH}): {batched:.0f} sentences/s, mean batch {mean_batch:.1f}, "
          f"p50 {np.percentile(batched_lat, 50):.1f} ms, p99 {np.percentile(batched_lat, 99):.1f} ms")
    print(f"served without batching: {unbatched:.0f} sentences/s, p50 {np.percentile(unbatched_lat, 50):.1f} ms, "
          f"p99 {np.percentile(unbatched_lat, 99):.1f} ms")
    print(result_line("encoder-serving-efficiency", batched, best, "sentences/s") +
          f"  (reference: in-process batch {best_batch})")
    print(result_line("encoder-batching-gain", batched, unbatched, "sentences/s"))


if __name__ == "__main__":
    main()
