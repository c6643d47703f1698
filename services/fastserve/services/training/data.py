"""Batches from a preprocessing dataset, in an order that depends only on (seed, epoch), so a job
resumed from a checkpoint continues with exactly the batch it would have seen next.

With several processes, each global batch of `batch_size * world` rows is cut into one slice per rank:
the data one process sees with batch 2B is what two processes see with batch B each.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fastserve.storage.datasets import DatasetReader


class SplitView:
    """Rows of one split gathered by index across its memory-mapped shards."""

    def __init__(self, reader: DatasetReader, split: str) -> None:
        self.shards = list(reader.shards(split))
        sizes = [len(next(iter(s.values()))) for s in self.shards]
        self.starts = np.cumsum([0, *sizes])
        self.rows = int(self.starts[-1])

    def take(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        shard_of = np.searchsorted(self.starts, rows, side="right") - 1
        names = self.shards[0].keys() if self.shards else ()
        located = list(zip(shard_of, rows - self.starts[shard_of], strict=True))
        return {name: np.stack([self.shards[s][name][r] for s, r in located]) for name in names}


def to_batch(arrays: dict[str, np.ndarray], task: str, pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Model inputs for `task` from dataset rows."""
    ids = torch.from_numpy(arrays["input_ids"].astype(np.int64)).to(device)
    if task == "causal_lm":
        return {"input_ids": ids, "labels": ids}
    width = ids.shape[1]
    lengths = torch.from_numpy(arrays["lengths"].astype(np.int64)).to(device)
    mask = (torch.arange(width, device=device)[None, :] < lengths[:, None]).long()
    if task == "sequence_classification":
        return {"input_ids": ids, "attention_mask": mask,
                "labels": torch.from_numpy(arrays["labels"].astype(np.int64)).to(device)}
    labels = torch.from_numpy(arrays["labels"].astype(np.int64)).to(device)
    label_lengths = torch.from_numpy(arrays["label_lengths"].astype(np.int64)).to(device)
    labels = labels.masked_fill(torch.arange(labels.shape[1], device=device)[None, :] >= label_lengths[:, None], -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def tokens_in(batch: dict[str, torch.Tensor]) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


@dataclass
class Position:
    """Where the sampler is: epoch and the index of the next global batch in it."""

    epoch: int = 0
    batch: int = 0


class Sampler:
    """Shuffled global batches over `rows`, reproducible from (seed, epoch); drops the ragged tail."""

    def __init__(self, rows: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.rows, self.batch, self.seed, self.rank, self.world = rows, batch_size, seed, rank, world
        self.global_batch = batch_size * world
        self.per_epoch = rows // self.global_batch
        if self.per_epoch == 0:
            raise ValueError(f"{rows} rows are fewer than one global batch of {self.global_batch}")
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    def _order_for(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.rows)
            self._order_epoch = epoch
        return self._order

    def rows_at(self, position: Position) -> np.ndarray:
        """This rank's rows of the global batch at `position`."""
        order = self._order_for(position.epoch)
        start = position.batch * self.global_batch + self.rank * self.batch
        return order[start:start + self.batch]

    def advance(self, position: Position) -> Position:
        following = position.batch + 1
        return Position(position.epoch + 1, 0) if following >= self.per_epoch else Position(position.epoch, following)
