"""make bench-gateway: what the OpenAI-compatible gateway costs a streamed generation, in one run.

The generation benchmark's 64 mixed-length requests (bench.generation's `workload` on its GPT: prompts
of 16 to 64 tokens, outputs of 8 to 256, no end-of-sequence token, so each runs to its length) sent at
once to one inference server process
- through one gateway process: `POST /v1/completions` with the prompt as token ids, `max_tokens` the
  request's length and `stream: true`, by an httpx.AsyncClient reading the server-sent events;
- straight to the inference service: the same requests as grpc.aio `GenerateStream` calls.

Both sides are greedy with the same lengths; every request's completion_tokens (from the usage of its
last message) must be its length on both sides, else the run fails. Time to first token is, both ways,
the time from sending the request to the first message that carries text. After a warm-up the two
sides alternate (ABBA) for BENCH_GATEWAY_REPEATS rounds (default 5); the RESULT line compares the
medians of tokens/s. The client, the gateway and the inference server share this machine's cores, so
the gateway's CPU is taken from the engine's: the CPU seconds each process used are printed per run.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import numpy as np
import torch
from transformers import AutoConfig

from bench.generation import MODEL_URI, REQUESTS, publish_model, request, workload
from bench.report import result_line
from fastserve.inference.v1 import inference_pb2 as pb
from fastserve.inference.v1 import inference_pb2_grpc
from tests.support.processes import Proc, start_gateway, start_inference

REPEATS = int(os.environ.get("BENCH_GATEWAY_REPEATS", "5"))
# The inference server's OpenMP threads (unset: torch's default, one per core). With as many threads as
# cores, any other busy process stalls the engine's parallel regions; 1 leaves a core to the gateway.
INFERENCE_THREADS = os.environ.get("BENCH_GATEWAY_INFERENCE_THREADS", "")
MODEL = "gpt"
TIMEOUT = 600.0

Work = list[tuple[list[int], int]]


@dataclass
class Run:
    """One burst: wall seconds, and per request its completion tokens and time to first token."""

    seconds: float
    tokens: list[int]
    ttft: list[float]

    @property
    def rate(self) -> float:
        return sum(self.tokens) / self.seconds


async def _burst(one, work: Work) -> Run:
    start = time.perf_counter()
    replies = await asyncio.gather(*(one(prompt, n) for prompt, n in work))
    seconds = time.perf_counter() - start
    return Run(seconds, [tokens for tokens, _ in replies], [ttft for _, ttft in replies])


async def over_http(client: httpx.AsyncClient, work: Work) -> Run:
    async def one(prompt: list[int], n: int) -> tuple[int, float]:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        ttft, tokens = None, -1
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"gateway answered {response.status_code}: {(await response.aread())[:500]!r}")
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if ttft is None and any(choice["text"] for choice in chunk["choices"]):
                    ttft = time.perf_counter() - start
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        return tokens, ttft if ttft is not None else time.perf_counter() - start

    return await _burst(one, work)


async def over_grpc(stub: inference_pb2_grpc.InferenceServiceStub, work: Work) -> Run:
    async def one(prompt: list[int], n: int) -> tuple[int, float]:
        unary = request(MODEL, prompt, n)
        call = pb.GenerateStreamRequest(model=unary.model, token_ids=unary.token_ids, sampling=unary.sampling)
        start = time.perf_counter()
        ttft, tokens = None, -1
        async for message in stub.GenerateStream(call, timeout=TIMEOUT):
            if ttft is None and message.text:
                ttft = time.perf_counter() - start
            if message.HasField("usage"):
                tokens = message.usage.completion_tokens
        return tokens, ttft if ttft is not None else time.perf_counter() - start

    return await _burst(one, work)


def check_tokens(side: str, run: Run, work: Work) -> None:
    """Both sides must do the same work: every request generates exactly its length."""
    wrong = [(i, got, n) for i, (got, (_, n)) in enumerate(zip(run.tokens, work, strict=True)) if got != n]
    if wrong:
        listed = ", ".join(f"#{i}: {got} of {n}" for i, got, n in wrong[:8])
        raise RuntimeError(f"{side}: {len(wrong)} of {len(work)} requests did not generate their length ({listed}); "
                           "the two sides would not be comparable")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc); NaN elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


async def measure(base_url: str, target: str, work: Work, procs: dict[str, Proc]) -> dict[str, list]:
    """Warm-up, then REPEATS rounds of both sides in ABBA order; per side its runs and CPU seconds used."""
    limits = httpx.Limits(max_connections=len(work) + 8, max_keepalive_connections=len(work) + 8)
    results: dict[str, list] = {"gateway": [], "grpc": []}
    async with httpx.AsyncClient(base_url=base_url, timeout=TIMEOUT, limits=limits) as client, \
            grpc.aio.insecure_channel(target) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        sides = {"gateway": lambda w: over_http(client, w), "grpc": lambda w: over_grpc(stub, w)}
        for side, send in sides.items():  # warm-up: connections, the engine's shapes
            check_tokens(side, await send(work[:16]), work[:16])
        for round_ in range(REPEATS):
            for side in (("gateway", "grpc") if round_ % 2 == 0 else ("grpc", "gateway")):
                before = {name: cpu_seconds(p.process.pid) for name, p in procs.items()}
                before["client"] = own_cpu_seconds()
                run = await sides[side](work)
                check_tokens(side, run, work)
                used = {name: cpu_seconds(p.process.pid) - before[name] for name, p in procs.items()}
                used["client"] = own_cpu_seconds() - before["client"]
                results[side].append((run, used))
    return results


def main() -> None:
    work_dir = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    folder = publish_model(work_dir / "home")
    vocab = AutoConfig.from_pretrained(str(folder)).vocab_size
    work = workload(REQUESTS, vocab)

    threads = {"OMP_NUM_THREADS": INFERENCE_THREADS} if INFERENCE_THREADS else {}
    server = start_inference(work_dir / "home", work_dir / "inference.log", FASTSERVE_LOG_LEVEL="WARNING",
                             FASTSERVE_INFERENCE_MODELS="none", **threads)
    gateway = None
    try:
        with grpc.insecure_channel(server.target) as channel:
            inference_pb2_grpc.InferenceServiceStub(channel).LoadModel(pb.LoadModelRequest(
                name=MODEL, model_uri=MODEL_URI, config=pb.ModelConfig(
                    scheduling=pb.SCHEDULING_POLICY_FCFS,
                    batching=pb.BatchingConfig(max_batch_size=REQUESTS, max_queue_size=4096))))
        gateway = start_gateway(server, work_dir / "gateway.log")
        results = asyncio.run(measure(f"http://127.0.0.1:{gateway.port}", server.target, work,
                                      {"gateway": gateway, "inference": server}))
    finally:
        if gateway is not None:
            gateway.stop()
        server.stop()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokens = sum(n for _, n in work)
    print(f"device {device}, {os.cpu_count()} cores shared by the benchmark client, the gateway and the inference "
          f"server (inference OpenMP threads: {INFERENCE_THREADS or 'default'}); GPT-2 4x256, vocab {vocab}, "
          "random weights")
    print(f"{REQUESTS} concurrent streamed requests, {tokens} tokens each run, {REPEATS} rounds (ABBA) after a warm-up")
    rates, ttfts = {}, {}
    for side, label in (("gateway", "through the gateway"), ("grpc", "over gRPC")):
        runs = [run for run, _ in results[side]]
        rates[side] = statistics.median(run.rate for run in runs)
        ttfts[side] = np.array([t for run in runs for t in run.ttft]) * 1e3
        cpu = {name: statistics.mean(used[name] for _, used in results[side]) for name in results[side][0][1]}
        print(f"  {label}: median {rates[side]:.0f} tokens/s (min {min(r.rate for r in runs):.0f}, max "
              f"{max(r.rate for r in runs):.0f}); TTFT p50 {np.percentile(ttfts[side], 50):.0f} ms, p99 "
              f"{np.percentile(ttfts[side], 99):.0f} ms; CPU s per run: "
              + ", ".join(f"{name} {seconds:.1f}" for name, seconds in cpu.items())
              + f" (wall {statistics.mean(r.seconds for r in runs):.1f} s)")
    print(result_line("gateway-efficiency", rates["gateway"], rates["grpc"], "tokens/s")
          + f"  (TTFT p50/p99: gateway {np.percentile(ttfts['gateway'], 50):.0f}/"
          f"{np.percentile(ttfts['gateway'], 99):.0f} ms, gRPC {np.percentile(ttfts['grpc'], 50):.0f}/"
          f"{np.percentile(ttfts['grpc'], 99):.0f} ms)")


if __name__ == "__main__":
    main()
