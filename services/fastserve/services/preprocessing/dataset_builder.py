"""Building tokenized datasets from a corpus, streamed in batches into numpy shards.

- causal LM: documents joined with the end-of-text token and cut into fixed blocks of `max_length`;
- sequence classification: each document truncated and padded to `max_length`, with its label id;
- seq2seq: source and target truncated and padded to their lengths.

Documents are assigned to train/validation/test before tokenizing, by a permutation drawn from the
seed, so splits are exact in size and the same seed gives the same split. A reader thread parses the
next batch while `encode_batch` (which releases the GIL and uses every core) tokenizes this one.
"""

from __future__ import annotations

import queue
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from fastserve.runtime.errors import InvalidArgument
from fastserve.services.preprocessing.corpus import Corpus
from fastserve.storage.datasets import SPLITS, TASKS, ShardWriter, ids_dtype

BATCH_DOCUMENTS = 2048
ROWS_PER_SHARD = 16384
CORPUS_FIELDS = ("text", "label", "target")


@dataclass(frozen=True)
class DatasetSpec:
    task: str
    max_length: int
    max_target_length: int = 0
    validation_fraction: float = 0.1
    test_fraction: float = 0.0
    seed: int = 0
    text_field: str = "text"
    label_field: str = "label"
    target_field: str = "target"

    def check(self, corpus_stats: dict[str, Any]) -> None:
        """Refuse what cannot build, naming the request field, before any work is queued."""
        if self.task not in TASKS:
            raise InvalidArgument("task must be DATASET_TASK_CAUSAL_LM, _SEQUENCE_CLASSIFICATION or _SEQ2SEQ",
                                  field="task")
        if not 2 <= self.max_length <= 65536:
            raise InvalidArgument("max_length must be in [2, 65536]", field="max_length")
        if self.task == "seq2seq" and not 0 <= self.max_target_length <= 65536:
            raise InvalidArgument("max_target_length must be in [0, 65536]", field="max_target_length")
        for name, value in (("validation_fraction", self.validation_fraction), ("test_fraction", self.test_fraction)):
            if not 0.0 <= value < 1.0:
                raise InvalidArgument(f"{name} must be in [0, 1)", field=f"splits.{name}")
        if self.validation_fraction + self.test_fraction >= 1.0:
            raise InvalidArgument("validation and test fractions leave no training data", field="splits")
        for key in ("text_field", "label_field", "target_field"):
            if getattr(self, key) not in CORPUS_FIELDS:
                raise InvalidArgument(f"the corpus has no field {getattr(self, key)!r}; corpora hold "
                                      f"{', '.join(CORPUS_FIELDS)}", field=key)
        if not 0 <= self.seed < 2**32:  # numpy's generators take 32-bit seeds
            raise InvalidArgument("seed must be in [0, 2**32)", field="splits.seed")
        if self.task == "sequence_classification" and self.label_field == self.text_field:
            raise InvalidArgument("label_field must differ from text_field", field="label_field")
        if self.task == "seq2seq" and self.target_field == self.text_field:
            raise InvalidArgument("target_field must differ from text_field", field="target_field")
        documents = corpus_stats["documents"]
        if self.task == "sequence_classification" and corpus_stats["with_label"] < documents:
            raise InvalidArgument(f"{documents - corpus_stats['with_label']} of {documents} documents have no label",
                                  field="label_field")
        if self.task == "seq2seq" and corpus_stats["with_target"] < documents:
            raise InvalidArgument(f"{documents - corpus_stats['with_target']} of {documents} documents have no "
                                  "target", field="target_field")
        split_sizes(documents, self)


def split_sizes(documents: int, spec: DatasetSpec) -> dict[str, int]:
    sizes = {"validation": round(documents * spec.validation_fraction), "test": round(documents * spec.test_fraction)}
    sizes["train"] = documents - sizes["validation"] - sizes["test"]
    for split, fraction in (("validation", spec.validation_fraction), ("test", spec.test_fraction)):
        if fraction > 0 and sizes[split] == 0:
            raise InvalidArgument(f"{fraction} of {documents} documents leaves the {split} split empty",
                                  field=f"splits.{split}_fraction")
    if sizes["train"] == 0:
        raise InvalidArgument(f"the train split of {documents} documents would be empty", field="splits")
    return sizes


def assign_splits(documents: int, spec: DatasetSpec) -> np.ndarray:
    """The split index (into SPLITS) of every document, from a seeded permutation."""
    sizes = split_sizes(documents, spec)
    order = np.random.default_rng(spec.seed).permutation(documents)
    assignment = np.zeros(documents, dtype=np.uint8)
    assignment[order[:sizes["validation"]]] = 1
    assignment[order[sizes["validation"]:sizes["validation"] + sizes["test"]]] = 2
    return assignment


def special_ids(tok: Tokenizer) -> dict[str, int]:
    """Pad and end-of-sequence ids, whatever the tokenizer's family."""
    def first(*tokens: str) -> int | None:
        return next((i for t in tokens if (i := tok.token_to_id(t)) is not None), None)
    eos = first("<|endoftext|>", "</s>", "[SEP]")
    pad = first("<pad>", "[PAD]")
    return {"eos_id": -1 if eos is None else eos, "pad_id": (pad if pad is not None else eos if eos is not None else 0)}


def _prefetch(batches: Iterator, depth: int = 2) -> Iterator:
    """Run `batches` in a thread, `depth` ahead of the consumer; errors surface in the consumer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in batches:
                if not put(item):
                    return  # the consumer stopped early
            put(done)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put(exc)

    threading.Thread(target=produce, daemon=True, name="corpus-reader").start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


class _Packer:
    """Joins token streams with the end-of-text id and emits full blocks; the tail is carried over."""

    def __init__(self, writer: ShardWriter, block: int, eos: int, dtype: np.dtype) -> None:
        self.writer, self.block, self.eos, self.dtype = writer, block, eos, dtype
        self.carry = np.empty(0, dtype=dtype)
        self.tokens = 0

    def add(self, id_lists: list[list[int]]) -> None:
        pieces = [self.carry]
        for ids in id_lists:
            pieces.append(np.asarray(ids, dtype=self.dtype))
            if self.eos >= 0:
                pieces.append(np.asarray([self.eos], dtype=self.dtype))
        stream = np.concatenate(pieces)
        self.tokens += len(stream) - len(self.carry)
        blocks = len(stream) // self.block
        if blocks:
            self.writer.add({"input_ids": stream[:blocks * self.block].reshape(blocks, self.block)})
        self.carry = stream[blocks * self.block:]


def _padded(id_lists: list[list[int]], width: int, pad: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    out = np.full((len(id_lists), width), pad, dtype=dtype)
    lengths = np.empty(len(id_lists), dtype=np.int32)
    for row, ids in enumerate(id_lists):
        ids = ids[:width]
        out[row, :len(ids)] = ids
        lengths[row] = len(ids)
    return out, lengths


Progress = Callable[[int, int], None]  # (documents done, corpus bytes read)


def build_dataset(corpus: Corpus, tok: Tokenizer, tokenizer_uri: str, spec: DatasetSpec, out: Path,
                  progress: Progress = lambda docs, read: None,
                  rows_per_shard: int = ROWS_PER_SHARD) -> dict[str, Any]:
    """Write the dataset's shards under `out` and return its `dataset` metadata entry."""
    spec.check(corpus.stats)
    documents = corpus.stats["documents"]
    assignment = assign_splits(documents, spec)
    ids = special_ids(tok)
    dtype = ids_dtype(tok.get_vocab_size(with_added_tokens=True))
    label_map = {label: i for i, label in enumerate(sorted(corpus.stats["labels"]))}
    writers = {split: ShardWriter(out, split, rows_per_shard) for split in SPLITS}
    packers = {split: _Packer(writers[split], spec.max_length, ids["eos_id"], dtype) for split in SPLITS}
    balance: dict[str, Counter] = {split: Counter() for split in SPLITS}
    tokens = 0
    done = 0
    for batch, offset in _prefetch(corpus.batches(BATCH_DOCUMENTS)):
        where = assignment[done:done + len(batch)]
        texts = [doc[spec.text_field] for doc in batch]
        if spec.task == "causal_lm":
            tok.no_truncation()
            encoded = [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]
            for index, split in enumerate(SPLITS):
                packers[split].add([e for e, s in zip(encoded, where, strict=True) if s == index])
        else:
            tok.enable_truncation(spec.max_length)
            encoded = [e.ids for e in tok.encode_batch_fast(texts)]
            tokens += sum(map(len, encoded))
            inputs, lengths = _padded(encoded, spec.max_length, ids["pad_id"], dtype)
            if spec.task == "sequence_classification":
                labels = np.array([label_map[doc[spec.label_field]] for doc in batch], dtype=np.int64)
                extra = {"labels": labels}
                for doc, s in zip(batch, where, strict=True):
                    balance[SPLITS[s]][doc[spec.label_field]] += 1
            else:
                width = spec.max_target_length or spec.max_length
                tok.enable_truncation(width)
                targets = [e.ids for e in tok.encode_batch_fast([doc[spec.target_field] for doc in batch])]
                label_ids, label_lengths = _padded(targets, width, ids["pad_id"], dtype)
                extra = {"labels": label_ids, "label_lengths": label_lengths}
            for index, split in enumerate(SPLITS):
                rows = where == index
                if rows.any():
                    writers[split].add({"input_ids": inputs[rows], "lengths": lengths[rows],
                                        **{k: v[rows] for k, v in extra.items()}})
        done += len(batch)
        progress(done, offset)
    if spec.task == "causal_lm":
        tokens = sum(p.tokens for p in packers.values())
    splits = {split: {**writers[split].close(), "documents": int((assignment == i).sum())}
              for i, split in enumerate(SPLITS)}
    if spec.task == "causal_lm" and splits["train"]["rows"] == 0:
        raise InvalidArgument(f"the training split has fewer than max_length={spec.max_length} tokens",
                              field="max_length")
    return {
        "task": spec.task, "tokenizer_uri": tokenizer_uri, "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "ids_dtype": dtype.name, **ids, "max_length": spec.max_length,
        "max_target_length": spec.max_target_length or (spec.max_length if spec.task == "seq2seq" else 0),
        "label_map": label_map if spec.task == "sequence_classification" else {},
        "seed": spec.seed, "fractions": {"validation": spec.validation_fraction, "test": spec.test_fraction},
        "documents": documents, "tokens": int(tokens), "splits": splits,
        "class_balance": {s: dict(sorted(c.items())) for s, c in balance.items()} if label_map and
        spec.task == "sequence_classification" else {},
    }
