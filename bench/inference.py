"""make bench-inference: all-MiniLM-L6-v2 embeddings served to 32 concurrent clients, each sending one
sentence at a time, against the same model batched in-process with the same batch cap.

One inference server process serves the model twice: with dynamic batching (batches of up to
BENCH_INFERENCE_BATCH inputs, default 32, one per client), and with batching off. The reference runs
transformers in this process, tokenizing and pooling inside the timed loop, at batch sizes up to the
same cap, and keeps its best. The device is chosen automatically (CUDA when present).

Fairness and stability: the three measurements run in interleaved rounds (reference, batched,
unbatched, then again), so a neighbour's load on a shared machine hits all of them alike; the ratio is
the median of the rounds' ratios and the spread (lowest to highest) is printed. The clients cost as
little as the gRPC client can: requests are serialized once up front and replies are not parsed, so
what the load generator takes from the server's cores is the transport alone.

Environment: BENCH_INFERENCE_REQUESTS (default 800 per phase), BENCH_INFERENCE_ROUNDS (default 3),
BENCH_INFERENCE_BATCH (default 32), BENCH_INFERENCE_SERVER_ENV (`NAME=value,...` more environment of the
server alone, to try a setting: `OMP_WAIT_POLICY=PASSIVE`, `FASTSERVE_GRPC_THREADS=8`).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from bench.report import median_item, result_line, spread
from fastserve.inference.v1 import inference_pb2 as pb
from fastserve.inference.v1 import inference_pb2_grpc
from fastserve.models.refs import BUILTIN_MODELS
from tests.support.processes import start_inference

CLIENTS = 32
BATCH = int(os.environ.get("BENCH_INFERENCE_BATCH", "32"))
REQUESTS = int(os.environ.get("BENCH_INFERENCE_REQUESTS", "800"))
ROUNDS = int(os.environ.get("BENCH_INFERENCE_ROUNDS", "3"))
MODEL = "all-MiniLM-L6-v2"
WORDS = "the quick brown fox jumps over the lazy dog while serving language models at scale".split()
EMBED = "/fastserve.inference.v1.InferenceService/Embed"
SERVER_ENV = dict(item.split("=", 1) for item in os.environ.get("BENCH_INFERENCE_SERVER_ENV", "").split(",") if item)


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(8, 24))) for _ in range(n)]


async def load_phase(target: str, model: str, texts: list[str]) -> tuple[float, list[float]]:
    """32 clients, one sentence per call, until `texts` are all sent; (sentences/s, latencies in ms)."""
    latencies: list[float] = []
    # Bytes in, bytes out: the client neither serializes nor parses during the timed phase.
    bodies = [pb.EmbedRequest(model=model, texts=[text]).SerializeToString() for text in texts]
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(EMBED)
        queue = list(reversed(bodies[:4 * CLIENTS]))

        async def client() -> None:
            while queue:
                body = queue.pop()
                start = time.perf_counter()
                await call(body, timeout=60)
                latencies.append((time.perf_counter() - start) * 1e3)

        await asyncio.gather(*(client() for _ in range(CLIENTS // 2)))  # a short warm-up at half load
        queue.extend(reversed(bodies))
        latencies.clear()
        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(CLIENTS)))
        elapsed = time.perf_counter() - start
    return len(texts) / elapsed, latencies


class InProcess:
    """The same model batched in this process, tokenizing and pooling inside the timed loop."""

    def __init__(self, texts: list[str]) -> None:
        path = str(BUILTIN_MODELS[MODEL]())
        self.texts = texts
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(self.device).eval()
        self.sizes = [b for b in (8, 16, 32, 64) if b <= BATCH] or [BATCH]

    def run(self, batch: int, n: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, n, batch):
                enc = self.tokenizer(self.texts[i:i + batch], padding=True, truncation=True, max_length=256,
                                     return_tensors="pt").to(self.device)
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).float()
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                torch.nn.functional.normalize(pooled, dim=1).cpu()
        return n / (time.perf_counter() - start)

    def best(self) -> tuple[int, float, dict[int, float]]:
        """(batch size, sentences/s) of the best size up to the cap, and every size's figure."""
        figures = {}
        for batch in self.sizes:
            self.run(batch, 64)
            figures[batch] = self.run(batch, len(self.texts))
        best = max(figures, key=figures.get)
        return best, figures[best], figures


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-inf-"))
    server = start_inference(work / "home", work / "inference.log", **{"FASTSERVE_LOG_LEVEL": "WARNING", **SERVER_ENV})
    reference = InProcess(sentences(512, seed=1))
    rounds: list[dict] = []
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
        for index in range(ROUNDS):
            best_batch, best, figures = reference.best()
            batched, batched_lat = asyncio.run(load_phase(target, f"{MODEL}-batched", texts))
            unbatched, unbatched_lat = asyncio.run(load_phase(target, f"{MODEL}-unbatched", texts))
            rounds.append(dict(best_batch=best_batch, best=best, figures=figures, batched=batched,
                               unbatched=unbatched, batched_lat=batched_lat, unbatched_lat=unbatched_lat))
            print(f"round {index + 1}: in-process " + ", ".join(f"batch {b}: {v:.0f}/s" for b, v in figures.items())
                  + f"; served batched {batched:.0f}/s (p50 {np.percentile(batched_lat, 50):.1f} ms, p99 "
                  f"{np.percentile(batched_lat, 99):.1f} ms), unbatched {unbatched:.0f}/s; efficiency "
                  f"{batched / best:.3f}, batching gain {batched / unbatched:.2f}", flush=True)
        with grpc.insecure_channel(target) as channel:
            stats = inference_pb2_grpc.InferenceServiceStub(channel).GetModelStatistics(
                pb.GetModelStatisticsRequest(name=f"{MODEL}-batched")).stats[0]
    finally:
        server.stop()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device {device}, {os.cpu_count()} cores, {CLIENTS} clients x 1 sentence, {REQUESTS} requests per "
          f"phase, {ROUNDS} interleaved rounds, batch cap {BATCH} on both sides")
    print(f"server environment: {SERVER_ENV or 'default'}")
    print(f"served mean batch {stats.inference_count / stats.batch_count:.1f} over all rounds")
    efficiency = [r["batched"] / r["best"] for r in rounds]
    gain = [r["batched"] / r["unbatched"] for r in rounds]
    print(f"efficiency per round: {spread(efficiency, 3)}; batching gain per round: {spread(gain, 3)}")
    # The median round carries the figures of the RESULT line.
    mid = median_item(rounds, lambda r: r["batched"] / r["best"])
    print(result_line("encoder-serving-efficiency", mid["batched"], mid["best"], "sentences/s") +
          f"  (reference: in-process batch {mid['best_batch']}; rounds {spread(efficiency, 3)})")
    mid = median_item(rounds, lambda r: r["batched"] / r["unbatched"])
    print(result_line("encoder-batching-gain", mid["batched"], mid["unbatched"], "sentences/s") +
          f"  (rounds {spread(gain, 3)})")


if __name__ == "__main__":
    main()
