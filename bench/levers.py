"""make bench-levers: what each CPU kernel lever gives the generation engine, one at a time, on this machine.

The model and workload are bench/generation.py's GPT-2-small shape (12x768, vocabulary 50257, random
weights; 32 requests, prompts 16-64, outputs 8-64), served over gRPC by one inference process. Each lever
runs against the same fp32 baseline and prints tokens/s, the ratio and its greedy parity (how many
requests produced exactly the baseline's tokens):
- threads: OMP_NUM_THREADS=1, and 2 threads bound to cores (OMP_PROC_BIND/OMP_PLACES), against torch's
  default (one thread per core). Interop threads are not a lever here: the server runs every model
  computation on one compute thread (compute.py) and nothing uses torch's interop pool.
- torchao int8: the optimization service's `int8_weight_only` and `int8_dynamic` folders (quantize_torch,
  save_quantized_torch), loaded by inference as any torchao folder.
- bf16 weights and KV cache (config.dtype "bf16", forced), on a cut workload (BENCH_LEVERS_BF16_REQUESTS
  requests, prompts of 16 tokens, 8 new) against fp32 on the same: on a CPU without bf16 hardware torch
  emulates it and a full run takes minutes.
- a compiled decode step: no runner hook exists, so this is a standalone experiment in this process: the
  same engine (Generator) with each block's MLP and the final norm replaced by `torch.compile(dynamic=True)`
  modules, against the same engine eager.

Knobs: BENCH_LEVERS (comma-separated subset of threads,int8,bf16,compile; default all).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from pathlib import Path

import grpc
import torch

from bench.generation import SHAPES, burst_ids, engine_tokens, publish_shape, workload
from bench.report import result_line
from fastserve.inference.v1 import inference_pb2 as pb
from fastserve.inference.v1 import inference_pb2_grpc
from fastserve.models.loading import cpu_has_bf16, load_model
from fastserve.storage.artifacts import ArtifactStore
from tests.support.processes import start_inference

SHAPE = SHAPES["gpt2-small"]
LEVERS = os.environ.get("BENCH_LEVERS", "threads,int8,bf16,compile").split(",")
BF16_REQUESTS = int(os.environ.get("BENCH_LEVERS_BF16_REQUESTS", "4"))


def serve(home: Path, log: Path, uri: str, work, dtype: str = "", **env: str) -> tuple[float, list[list[int]]]:
    """(tokens/s, each request's ids) of `work` on the model at `uri`, in a fresh server with `env`."""
    server = start_inference(home, log, FASTSERVE_LOG_LEVEL="WARNING", FASTSERVE_INFERENCE_MODELS="none", **env)
    try:
        with grpc.insecure_channel(server.target) as channel:
            inference_pb2_grpc.InferenceServiceStub(channel).LoadModel(pb.LoadModelRequest(
                name="m", model_uri=uri, config=pb.ModelConfig(dtype=dtype, batching=pb.BatchingConfig(
                    max_batch_size=len(work), max_queue_size=4096))), timeout=600)
        asyncio.run(burst_ids(server.target, "m", [(p[:8], 2) for p, _ in work[:2]]))  # warm-up
        seconds, ids = asyncio.run(burst_ids(server.target, "m", work))
    finally:
        server.stop()
    return sum(map(len, ids)) / seconds, ids


def quantized(home: Path, folder: Path, method: str) -> str:
    """The optimization service's torchao `method` of `folder`, published beside it; its URI."""
    from fastserve.models.kinds import DECODER
    from fastserve.models.quantized import save_quantized_torch
    from fastserve.services.optimization.quantize import quantize_torch

    name = f"bench-{SHAPE.name}-{method.replace('_', '-')}"
    with ArtifactStore(home / "artifacts").publish("models", name) as draft:
        save_quantized_torch(quantize_torch(load_model(folder, DECODER), method), draft.path)
        for item in folder.iterdir():
            if item.name.startswith(("tokenizer", "special_tokens", "generation_config")):
                shutil.copy(item, draft.path / item.name)
    return f"artifact://models/{name}/1"


def same(ids: list[list[int]], base: list[list[int]]) -> str:
    return f"greedy parity {sum(a == b for a, b in zip(ids, base, strict=True))}/{len(base)}"


def compiled_engine(folder: Path, work) -> dict[str, float]:
    """Tokens/s of the engine in this process, eager and with compiled MLPs (standalone: no runner hook)."""
    from fastserve.services.inference.generation_settings import GenerationSettings
    from fastserve.services.inference.generator import Generator

    out = {}
    for mode in ("eager", "compiled"):
        gen = Generator("m", folder, "", GenerationSettings(max_batch_size=len(work), max_queue_size=4096))
        if mode == "compiled":
            base = gen.engine.runner.decoder.base
            for block in base.h:
                block.mlp = torch.compile(block.mlp, dynamic=True)
            base.ln_f = torch.compile(base.ln_f, dynamic=True)
        engine_tokens(gen, work[:8])  # warm-up (and compile, for the shapes seen)
        start = time.perf_counter()
        tokens = engine_tokens(gen, work)
        out[mode] = tokens / (time.perf_counter() - start)
        gen.drain()
    return out


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-levers-"))
    home = root / "home"
    folder = publish_shape(home, SHAPE)
    work = workload(SHAPE.requests, SHAPE.vocab, longest=SHAPE.longest)
    print(f"{os.cpu_count()} cores, CPU capability {torch.backends.cpu.get_cpu_capability()}, bf16 hardware "
          f"{cpu_has_bf16()}; {SHAPE.name}, {SHAPE.requests} requests, outputs 8-{SHAPE.longest}")
    base, base_ids = serve(home, root / "base.log", SHAPE.uri, work)
    print(f"baseline fp32 (auto picks fp32 here), default threads: {base:.1f} tokens/s")

    def lever(name: str, value: float, ids, reference: float = base, ref_ids=base_ids) -> None:
        print(result_line(f"lever-{name}", value, reference, "tokens/s") + f"  ({same(ids, ref_ids)})")

    if "threads" in LEVERS:
        for name, env in (("omp-1-thread", {"OMP_NUM_THREADS": "1"}),
                          ("omp-2-threads-bound", {"OMP_NUM_THREADS": "2", "OMP_PROC_BIND": "close",
                                                   "OMP_PLACES": "cores"}),
                          ("omp-2-threads-passive", {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"})):
            lever(name, *serve(home, root / f"{name}.log", SHAPE.uri, work, **env))
    if "int8" in LEVERS:
        for method in ("int8_weight_only", "int8_dynamic"):
            uri = quantized(home, folder, method)
            lever(f"torchao-{method.replace('_', '-')}", *serve(home, root / f"{method}.log", uri, work))
    if "bf16" in LEVERS:
        cut = [(p[:16], 8) for p, _ in work[:BF16_REQUESTS]]
        fp32, fp32_ids = serve(home, root / "fp32-cut.log", SHAPE.uri, cut, dtype="fp32")
        bf16, bf16_ids = serve(home, root / "bf16.log", SHAPE.uri, cut, dtype="bf16")
        lever("bf16-forced", bf16, bf16_ids, fp32, fp32_ids)
    if "compile" in LEVERS:
        figures = compiled_engine(folder, work)
        print(result_line("lever-compiled-mlp-standalone", figures["compiled"], figures["eager"], "tokens/s")
              + "  (in-process engine, compiled block MLPs and final norm, against the same engine eager)")


if __name__ == "__main__":
    main()
