"""make bench-gpu: generation on a CUDA device, the engine against transformers `generate()` and a bare
CUDA-graph decode loop, in one run.

GPT-2-small shape (12 layers, 768 wide, 12 heads), random weights, bf16; prompts of 32 tokens, 128 new
tokens each, greedy, at batch 1, 64 and 256:
- fastserve: the engine in this process (scheduling, prefill, sampling and output processing included),
  every request submitted at once, tokens/s from the first submit to the last completion;
- reference `generate()`: transformers on the same model and device, one static batch;
- reference graph: a plain PyTorch decode step over a static KV cache captured as a CUDA graph and replayed
  (the anchor of ../shared/anchors/gpu_graph_decode.py), the ceiling of a pure-PyTorch loop.
Each figure is the median of BENCH_GPU_REPEATS runs (default 3), printed with its spread.

On a machine without CUDA it says so and exits 0, printing no RESULT line.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.report import result_line, spread

BATCHES = (1, 64, 256)
PROMPT, NEW = 32, 128
REPEATS = int(os.environ.get("BENCH_GPU_REPEATS", "3"))


def prompts(batch: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (batch, PROMPT), generator=g).tolist()


def engine_rate(generator, batch: int, vocab: int, seed: int) -> float:
    from bench.generation import engine_tokens
    torch.cuda.synchronize()
    start = time.perf_counter()
    tokens = engine_tokens(generator, [(p, NEW) for p in prompts(batch, vocab, seed)])
    return tokens / (time.perf_counter() - start)


def generate_rate(model, batch: int, vocab: int, seed: int) -> float:
    ids = torch.tensor(prompts(batch, vocab, seed), device="cuda")
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                             min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    return (out.shape[1] - PROMPT) * batch / (time.perf_counter() - start)


def graph_rate(batch: int, vocab: int) -> float:
    """The anchor's loop: GPT-2-small shape, static cache of PROMPT + NEW positions, one captured step."""
    layers, width, heads, window, dtype = 12, 768, 12, PROMPT + NEW, torch.bfloat16
    head_dim, g = width // heads, torch.Generator().manual_seed(0)

    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to("cuda", dtype)

    emb, pos_emb = w(vocab, width), w(window, width)
    ones = torch.ones(width, device="cuda", dtype=dtype)
    weights = [(w(width, 3 * width), w(width, width), w(width, 4 * width), w(4 * width, width)) for _ in range(layers)]
    kc = torch.zeros(layers, batch, heads, window, head_dim, device="cuda", dtype=dtype)
    vc = torch.zeros_like(kc)
    tok = torch.randint(0, vocab, (batch,), device="cuda")
    pos = torch.full((1,), PROMPT, dtype=torch.long, device="cuda")

    def step() -> torch.Tensor:
        x = emb[tok] + pos_emb[pos]
        mask = (torch.arange(window, device="cuda") <= pos).view(1, 1, 1, window)
        for i, (qkv, o, fc, proj) in enumerate(weights):
            q, k, v = (F.layer_norm(x, (width,), ones) @ qkv).view(batch, 3, heads, head_dim).unbind(1)
            kc[i].index_copy_(2, pos, k.unsqueeze(2))
            vc[i].index_copy_(2, pos, v.unsqueeze(2))
            x = x + F.scaled_dot_product_attention(q.unsqueeze(2), kc[i], vc[i], attn_mask=mask).view(batch, width) @ o
            x = x + F.gelu(F.layer_norm(x, (width,), ones) @ fc) @ proj
        return (x @ emb.t()).argmax(-1)

    with torch.inference_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(NEW):
            graph.replay()
            tok.copy_(out)
            pos.add_(1).clamp_(max=window - 1)
        torch.cuda.synchronize()
    return batch * NEW / (time.perf_counter() - start)


def main() -> None:
    if not torch.cuda.is_available():
        print("bench-gpu: no CUDA device on this machine; nothing measured (run it where torch sees a GPU)")
        return
    from transformers import AutoModelForCausalLM

    from bench.generation import SHAPES, publish_shape
    from fastserve.services.inference.generation_settings import MAX_PREFILL_TOKENS, GenerationSettings
    from fastserve.services.inference.generator import Generator

    shape = SHAPES["gpt2-small"]
    folder, vocab = publish_shape(Path(tempfile.mkdtemp(prefix="bench-gpu-")), shape), shape.vocab
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16).to("cuda").eval()
    print(f"device {torch.cuda.get_device_name(0)}; GPT-2-small shape, vocab {vocab}, bf16; prompt {PROMPT}, "
          f"{NEW} new tokens, greedy")
    for batch in BATCHES:
        settings = GenerationSettings(max_batch_size=batch, max_queue_size=batch, context=PROMPT + NEW,
                                      max_prefill_tokens=min(batch * PROMPT, MAX_PREFILL_TOKENS))
        generator = Generator(f"gpu-{batch}", folder, "bf16", settings)
        try:
            engine_rate(generator, min(batch, 8), vocab, seed=99)  # warm-up
            ours = [engine_rate(generator, batch, vocab, seed) for seed in range(REPEATS)]
        finally:
            generator.drain()
        generate_rate(model, min(batch, 8), vocab, seed=99)
        theirs = [generate_rate(model, batch, vocab, seed) for seed in range(REPEATS)]
        graph = [graph_rate(batch, vocab) for _ in range(REPEATS)]
        print(f"batch {batch}: engine {spread(ours, 0)}; generate() {spread(theirs, 0)}; graph loop "
              f"{spread(graph, 0)} tokens/s")
        print(result_line(f"gpu-engine-vs-generate-b{batch}", statistics.median(ours), statistics.median(theirs),
                          "tokens/s"))
        print(result_line(f"gpu-engine-vs-graph-loop-b{batch}", statistics.median(ours), statistics.median(graph),
                          "tokens/s"))
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
