"""The dataset format shared by preprocessing (which writes it) and training (which reads it).

A dataset artifact holds, per split (`train`, `validation`, `test`), numpy shards
`<split>/<array>-<NNNNN>.npy` that load memory-mapped: `input_ids` (uint16 when the vocabulary fits,
else uint32), and by task `labels`, `lengths`, `label_lengths`. The manifest metadata `dataset`
entry records the task, tokenizer, block or maximum length, special token ids, label map, split
seed and fractions, and each split's row count and shards; the artifact manifest has every file's
sha256.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

SPLITS = ("train", "validation", "test")
TASKS = ("causal_lm", "sequence_classification", "seq2seq")


def ids_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


class ShardWriter:
    """Collects rows of named arrays for one split and writes a shard every `rows_per_shard` rows, so
    memory holds at most one shard whatever the dataset's size."""

    def __init__(self, root: Path, split: str, rows_per_shard: int) -> None:
        self.folder = root / split
        self.folder.mkdir(parents=True, exist_ok=True)
        self.split = split
        self.rows_per_shard = rows_per_shard
        self.pending: dict[str, list[np.ndarray]] = {}
        self.pending_rows = 0
        self.rows = 0
        self.shards: list[dict[str, Any]] = []

    def add(self, arrays: dict[str, np.ndarray]) -> None:
        """Append rows: every array has the same first dimension."""
        counts = {len(a) for a in arrays.values()}
        assert len(counts) == 1, f"arrays of different row counts: {counts}"
        for name, array in arrays.items():
            self.pending.setdefault(name, []).append(array)
        self.pending_rows += counts.pop()
        while self.pending_rows >= self.rows_per_shard:
            self._flush(self.rows_per_shard)

    def _flush(self, rows: int) -> None:
        joined = {name: np.concatenate(parts) for name, parts in self.pending.items()}
        index = len(self.shards)
        files = {}
        for name, array in joined.items():
            files[name] = f"{self.split}/{name}-{index:05d}.npy"
            np.save(self.folder / f"{name}-{index:05d}.npy", array[:rows])
        self.shards.append({"rows": rows, "files": files})
        self.rows += rows
        self.pending = {name: [array[rows:]] for name, array in joined.items()}
        self.pending_rows -= rows

    def close(self) -> dict[str, Any]:
        if self.pending_rows:
            self._flush(self.pending_rows)
        return {"rows": self.rows, "shards": self.shards}


class DatasetReader:
    """Reads a published dataset: its description and its shards, memory-mapped."""

    def __init__(self, path: Path, metadata: dict[str, Any]) -> None:
        self.path = Path(path)
        self.info = metadata["dataset"]

    @property
    def task(self) -> str:
        return self.info["task"]

    def rows(self, split: str) -> int:
        return self.info["splits"][split]["rows"]

    def shards(self, split: str) -> Iterator[dict[str, np.ndarray]]:
        for shard in self.info["splits"][split]["shards"]:
            yield {name: np.load(self.path / file, mmap_mode="r") for name, file in shard["files"].items()}

    def arrays(self, split: str) -> dict[str, np.ndarray]:
        """A whole split in memory (fine for the small datasets of tests and demos)."""
        parts: dict[str, list[np.ndarray]] = {}
        for shard in self.shards(split):
            for name, array in shard.items():
                parts.setdefault(name, []).append(np.asarray(array))
        return {name: np.concatenate(arrays) for name, arrays in parts.items()}
