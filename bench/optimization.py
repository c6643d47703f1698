"""make bench-optimization: all-MiniLM-L6-v2 quantized to int8 for ONNX Runtime (CPU) against fp32
PyTorch, side by side, both through the encoder backends inference serves with (`fastserve.models.encoders`)
on the same tokenized inputs; then a small GPT, trained here, pruned 50% (attention heads and MLP channels)
against itself.

The int8 model is made by the optimization pipeline's own steps (export, then ONNX int8); quality is
the minimum cosine similarity of its sentence embeddings to fp32 over 1,000 held-out stdlib docstrings.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.report import result_line
from fastserve.corpora.stdlib import stdlib_documents
from fastserve.models.encoders import OnnxBackend, TorchBackend
from fastserve.models.refs import BUILTIN_MODELS
from fastserve.runtime.config import Config
from fastserve.runtime.stores import Stores
from fastserve.services.optimization import export, measure, prune, quantize
from fastserve.services.preprocessing.core import Preprocessing
from fastserve.services.training.core import Training
from fastserve.storage.datasets import DatasetReader


def throughput(backend, rows: list[list[int]], batch: int, seconds: float = 8.0) -> float:
    backend.run(rows[:batch])
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for i in range(0, len(rows), batch):
            backend.run(rows[i:i + batch])
            done += len(rows[i:i + batch])
            if time.perf_counter() - start >= seconds:
                break
    return done / (time.perf_counter() - start)


def minilm(work: Path) -> None:
    source = BUILTIN_MODELS["all-MiniLM-L6-v2"]()
    fp32_dir, int8_dir = work / "fp32-onnx", work / "int8"
    export.export_encoder_onnx(source, fp32_dir)
    int8_dir.mkdir()
    for item in fp32_dir.iterdir():
        if item.is_file() and item.suffix != ".onnx":
            (int8_dir / item.name).write_bytes(item.read_bytes())
    quantize.quantize_onnx_int8_dynamic(fp32_dir / "model.onnx", int8_dir / "model.onnx")
    fp32, int8 = TorchBackend(source, "embedding"), OnnxBackend(int8_dir, "embedding")
    texts = [d["text"][:300] for d in stdlib_documents(seed=1234, max_documents=1000)]
    rows = [fp32.encoder.encode([t], truncate=True).ids[0] for t in texts]
    short = rows[:200]
    print(f"MiniLM: {len(rows)} held-out docstrings, {torch.get_num_threads()} torch threads, "
          f"ONNX Runtime providers {int8.providers}")
    for batch, name in ((1, "int8-speed-batch1"), (32, "int8-speed-batch32")):
        a, b = throughput(int8, short, batch), throughput(fp32, short, batch)
        print(result_line(name, a, b, "sentences/s"))
    fp32_bytes = (source / "model.safetensors").stat().st_size
    int8_bytes = (int8_dir / "model.onnx").stat().st_size
    print(result_line("int8-size", int8_bytes / 1e6, fp32_bytes / 1e6, "MB", higher_is_better=False))
    reference = np.concatenate([fp32.run(rows[i:i + 32]) for i in range(0, len(rows), 32)])
    quantized = np.concatenate([int8.run(rows[i:i + 32]) for i in range(0, len(rows), 32)])
    cosine = measure.min_cosine(reference, quantized)
    print(f"RESULT int8-cosine fastserve={cosine:.4f} reference=1.0 ratio={cosine:.4f}")


def small_gpt(work: Path) -> None:
    stores = Stores.from_config(Config.from_env({"FASTSERVE_HOME": str(work / "home")}))
    pre, trainer = Preprocessing(stores), Training(stores)
    source = {"builtin": {"name": "stdlib-docstrings", "seed": 0}}
    tok = pre.run_train_tokenizer({"source": source, "model": "bpe", "vocab_size": 2000, "output_name": "bpe"})
    data = pre.run_build_dataset({"source": source, "tokenizer_uri": tok["tokenizer_uri"], "task": "causal_lm",
                                  "max_length": 128, "splits": {"validation_fraction": 0.05}, "output_name": "clm"})
    params = {"model": {"architecture": {"family": "gpt2", "num_layers": 4, "hidden_size": 256, "num_heads": 8}},
              "task": "causal_lm", "dataset_uri": data["dataset_uri"], "output_name": "gpt",
              "hyperparameters": {"learning_rate": 2e-3, "batch_size": 16, "max_steps": 300, "warmup_steps": 30,
                                  "log_interval_steps": 100, "eval_interval_steps": 1000}}

    class Quiet:
        def report(self, step, total, metrics):
            pass

        def should_stop(self):
            return False

        def checkpoint(self, step, write):
            return ""

    prepared = trainer.prepare(params)
    model, _ = trainer.train(prepared, "bench", Quiet())
    model.eval()
    artifact = stores.artifacts.resolve(data["dataset_uri"])
    blocks = DatasetReader(artifact.path, artifact.manifest["metadata"]).arrays("validation")["input_ids"][:64]
    blocks = blocks.astype(np.int64)
    batch = torch.from_numpy(blocks[:8])

    def speed(m) -> float:
        with torch.inference_mode():
            return measure.latency(lambda: m(input_ids=batch), runs=20, warmup=3)["p50_ms"]

    before_ms, before_ppl = speed(model), measure.perplexity(model, blocks)
    before_params = measure.count_parameters(model)
    prune.prune_heads(model, 0.5)
    prune.prune_mlp_channels(model, 0.5)
    after_ms, after_ppl, after_params = speed(model), measure.perplexity(model, blocks), measure.count_parameters(model)
    print(f"small GPT (4x256, trained 300 steps here), 50% heads and 50% MLP channels pruned: parameters "
          f"{before_params} -> {after_params}; forward of 8x128 tokens {before_ms:.1f} ms -> {after_ms:.1f} ms")
    print(result_line("pruned-gpt-speed", 1e3 / after_ms, 1e3 / before_ms, "batches/s"))
    print(f"pruned-gpt perplexity: {before_ppl:.1f} -> {after_ppl:.1f} (x{after_ppl / before_ppl:.2f}, "
          "no fine-tuning after pruning)")


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-opt-"))
    print(f"cores: {os.cpu_count()}")
    minilm(work)
    small_gpt(work)


if __name__ == "__main__":
    main()
