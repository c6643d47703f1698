"""Measurements that compare an optimized model with its source: size, parameters, latency, perplexity and
sentence embeddings. Plain functions over models, sessions and arrays; nothing here knows of jobs or gRPC.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fastserve.models.kinds import ENCODER
from fastserve.models.loading import load_model
from fastserve.models.pooling import mean_pool
from fastserve.models.tokenizers import load_transformers_tokenizer
from fastserve.runtime.errors import InvalidArgument


def size_on_disk(path: Path) -> int:
    """Bytes of a file, or of every file under a folder (links are not followed)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        raise InvalidArgument(f"{path} does not exist", field="path")
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters: a weight tied to another (GPT-2's lm_head) counts once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _check_runs(runs: int, warmup: int) -> None:
    if not isinstance(runs, int) or runs < 1:
        raise InvalidArgument(f"runs must be a positive integer, not {runs!r}", field="runs")
    if not isinstance(warmup, int) or warmup < 0:
        raise InvalidArgument(f"warmup must be a non-negative integer, not {warmup!r}", field="warmup")


def latency(call: Callable[[], Any], runs: int, warmup: int) -> dict[str, float]:
    """Warm-up calls (allocations, lazy kernel selection) are run but not timed."""
    _check_runs(runs, warmup)
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    ordered = sorted(times)
    return {"p50_ms": statistics.median(times), "p90_ms": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
            "mean_ms": statistics.fmean(times), "min_ms": ordered[0], "runs": runs}


def latency_torch(model: nn.Module, inputs: dict[str, torch.Tensor], runs: int, warmup: int) -> dict[str, float]:
    """Milliseconds per forward pass under inference_mode (p50, p90, mean, min). On CUDA each call is
    synchronised, so the time is the kernels' and not just the launches'."""
    model.eval()
    device = next(iter(inputs.values())).device if inputs else torch.device("cpu")

    def call() -> None:
        with torch.inference_mode():
            model(**inputs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return latency(call, runs, warmup)


def latency_onnx(session: Any, inputs: dict[str, np.ndarray], runs: int, warmup: int) -> dict[str, float]:
    """Milliseconds per `session.run` over all outputs (p50, p90, mean, min)."""
    return latency(lambda: session.run(None, inputs), runs, warmup)


def _logits(model_or_callable: nn.Module | Callable, ids: torch.Tensor) -> torch.Tensor:
    if isinstance(model_or_callable, nn.Module):
        return model_or_callable(input_ids=ids).logits
    out = model_or_callable(ids)
    return out if isinstance(out, torch.Tensor) else torch.from_numpy(np.asarray(out))


def perplexity(model_or_callable: nn.Module | Callable, token_blocks: np.ndarray, batch_size: int = 8) -> float:
    """exp(mean next-token cross-entropy) of a causal LM over [n, L] token blocks (every position but the
    first of each block is predicted). A callable takes a [b, L] LongTensor and returns [b, L, vocab] logits,
    so an ONNX session can be measured the same way."""
    blocks = np.asarray(token_blocks)
    if blocks.ndim != 2 or blocks.shape[1] < 2 or not np.issubdtype(blocks.dtype, np.integer):
        raise InvalidArgument("token_blocks must be an integer array of shape [n, L] with L >= 2",
                              field="token_blocks")
    if isinstance(model_or_callable, nn.Module):
        model_or_callable.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(blocks), batch_size):
            ids = torch.from_numpy(blocks[start:start + batch_size].astype(np.int64))
            logits = _logits(model_or_callable, ids).float()
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                               reduction="sum")
            total += float(loss)
            count += ids[:, 1:].numel()
    return math.exp(total / count)


def _batches(texts: Sequence[str], batch_size: int) -> list[list[str]]:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidArgument(f"batch_size must be a positive integer, not {batch_size!r}", field="batch_size")
    return [list(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]


def embeddings_torch(model_dir_or_model: Path | str | nn.Module, tokenizer: Any, texts: Sequence[str],
                     batch_size: int = 32) -> np.ndarray:
    """Sentence embeddings [n, hidden] from a PyTorch encoder's last_hidden_state (mean pooling, L2 norm).
    `tokenizer` may be None when a folder is given: the folder's own tokenizer is used."""
    model = model_dir_or_model
    if not isinstance(model, nn.Module):
        model = load_model(Path(model_dir_or_model), ENCODER, dtype=torch.float32, field="model")
        tokenizer = tokenizer or load_transformers_tokenizer(Path(model_dir_or_model), field="model")
    model.eval()
    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for batch in _batches(texts, batch_size):
            enc = tokenizer(batch, padding=True, truncation=True, return_tensors="pt")
            hidden = model(input_ids=enc["input_ids"].to(device),
                           attention_mask=enc["attention_mask"].to(device)).last_hidden_state
            out.append(mean_pool(hidden.float().cpu().numpy(), enc["attention_mask"].numpy()))
    return np.concatenate(out)


def embeddings_onnx(session: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
    """Sentence embeddings [n, hidden] from an ONNX encoder (first output = last_hidden_state)."""
    names = {i.name for i in session.get_inputs()}
    output = session.get_outputs()[0].name
    out = []
    for batch in _batches(texts, batch_size):
        enc = tokenizer(batch, padding=True, truncation=True, return_tensors="np")
        feed = {"input_ids": enc["input_ids"].astype(np.int64),
                "attention_mask": enc["attention_mask"].astype(np.int64)}
        if "token_type_ids" in names:
            feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
        (hidden,) = session.run([output], {k: v for k, v in feed.items() if k in names})
        out.append(mean_pool(hidden, feed["attention_mask"]))
    return np.concatenate(out)


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest row-wise cosine similarity between two [n, d] embedding matrices."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise InvalidArgument(f"embeddings must have the same [n, d] shape, got {a.shape} and {b.shape}",
                              field="embeddings")
    a = a / np.clip(np.linalg.norm(a, axis=1, keepdims=True), 1e-12, None)
    b = b / np.clip(np.linalg.norm(b, axis=1, keepdims=True), 1e-12, None)
    return float((a * b).sum(1).min())
