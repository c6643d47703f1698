"""Encoder backends: PyTorch (CUDA when present, fp32/bf16/fp16) and ONNX Runtime (its CUDA provider
when the session really has it, else CPU), with the task heads on top: embeddings (mean pooling and
L2 normalisation, as sentence-transformers does for all-MiniLM-L6-v2), sequence classification
(labels and softmax scores), and raw outputs.

Inference serves encoders through these, and optimization measures a model's latency, throughput and
quality through the very same ones, so a report describes what serving will do. That is why they live in
the shared models layer rather than in either service.

Texts are tokenized on the caller's thread when a request arrives (so a too-long text is refused
before it queues); a batch only pads the token ids and runs the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastserve.models.kinds import CLASSIFIER, ENCODER, folder_label, read_config
from fastserve.models.loading import (
    ONNX,
    ONNX_FILE,
    load_model,
    onnx_session,
    pick_device,
    torch_dtype,
    weights_format,
)
from fastserve.models.pooling import mean_pool
from fastserve.models.tokenizers import load_tokenizer
from fastserve.runtime.errors import FailedPrecondition, InvalidArgument

TASKS = ("embedding", "sequence_classification", "raw")
# RoBERTa's family numbers positions from padding_idx + 1 (BERT's from 0), so the first padding_idx + 1 rows of
# its position table never hold a token: a 514-row table fits 512 tokens.
OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert")


def window_of(config: dict[str, Any]) -> int:
    """The most tokens (special ones included) one text may have: the position table's usable rows, capped
    at 512 as BERT-style checkpoints are trained."""
    rows = int(config.get("max_position_embeddings", 512))
    if config.get("model_type") in OFFSET_POSITIONS:
        rows -= int(config.get("pad_token_id") or 0) + 1
    return max(1, min(rows, 512))


@dataclass
class Encoded:
    """One request's texts as token ids."""

    ids: list[list[int]]

    @property
    def longest(self) -> int:
        return max(map(len, self.ids))


class TextEncoder:
    """Tokenizes requests: strictly (a text over the window is refused) or truncating."""

    def __init__(self, folder: Path, max_length: int, pad_id: int | None = None) -> None:
        """`pad_id`: the config's pad token, which wins over the tokenizer's guess: RoBERTa's family tells
        padding from text by it when it numbers positions."""
        self.max_length = max_length
        self.strict = load_tokenizer(folder, field="model_uri")
        self.strict.no_truncation()
        self.strict.no_padding()
        self.truncating = load_tokenizer(folder, field="model_uri")
        self.truncating.no_padding()
        self.truncating.enable_truncation(max_length)
        if pad_id is None:
            pad_id = next((i for t in ("[PAD]", "<pad>") if (i := self.strict.token_to_id(t)) is not None), 0)
        self.pad_id = pad_id

    def encode(self, texts: list[str], truncate: bool) -> Encoded:
        if not texts:
            raise InvalidArgument("the batch is empty: send at least one text", field="texts")
        tok = self.truncating if truncate else self.strict
        ids = [e.ids for e in tok.encode_batch_fast(texts)]
        for index, row in enumerate(ids):
            if len(row) > self.max_length:
                raise InvalidArgument(f"text {index} has {len(row)} tokens, over the model's window of "
                                      f"{self.max_length}; shorten it or set truncate", field=f"texts[{index}]")
        return Encoded(ids)

    def pad(self, rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        width = max(map(len, rows))
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = row
            mask[i, :len(row)] = 1
        return ids, mask


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


class EncoderBackend:
    """Runs padded batches; subclasses provide `_forward(ids, mask) -> hidden states or logits`."""

    platform = ""

    def __init__(self, folder: Path, task: str) -> None:
        if task not in TASKS:
            raise InvalidArgument(f"task must be one of {', '.join(TASKS)}", field="config.task")
        self.folder, self.task = folder, task
        config = read_config(folder)
        window = window_of(config)
        sbert = folder / "sentence_bert_config.json"
        if sbert.is_file():  # sentence-transformers models declare the window they were trained with
            window = min(window, int(json.loads(sbert.read_text()).get("max_seq_length", window)))
        self.max_length = window
        self.labels = [config.get("id2label", {}).get(str(i), str(i)) for i in range(len(config.get("id2label", {})))]
        if task == "sequence_classification" and not self.labels:
            raise InvalidArgument(f"{folder.name} has no classification head (no id2label)", field="config.task")
        pad = config.get("pad_token_id")
        self.encoder = TextEncoder(folder, self.max_length, pad if isinstance(pad, int) else None)
        self.dimension = int(config.get("hidden_size") or config.get("dim") or 0)  # DistilBERT's is "dim"

    def run(self, rows: list[list[int]]) -> np.ndarray:
        """Task outputs for token-id rows: embeddings [n, dim], class probabilities [n, labels] or
        the raw hidden states of each row (a list of [len, dim] arrays)."""
        ids, mask = self.encoder.pad(rows)
        out = self._forward(ids, mask)
        if self.task == "embedding":
            return mean_pool(out, mask)
        if self.task == "sequence_classification":
            return softmax(out)
        return [out[i, :len(r)] for i, r in enumerate(rows)]

    def _forward(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class TorchBackend(EncoderBackend):
    platform = "pytorch"

    def __init__(self, folder: Path, task: str, dtype: str = "") -> None:
        """Any PyTorch folder `fastserve.models.loading` loads: plain, head-pruned or torchao-quantized."""
        if weights_format(folder) == ONNX:
            raise FailedPrecondition(f"{folder_label(folder)} holds only an ONNX graph ({ONNX_FILE}, "
                                     "no PyTorch weights): serve it on ONNX Runtime", field="config.backend")
        super().__init__(folder, task)
        self.device = pick_device()
        dtype_ = torch_dtype(dtype, self.device)
        # Embeddings and raw outputs need the bare encoder even from a classifier's folder.
        kind = CLASSIFIER if task == "sequence_classification" else ENCODER
        self.model = load_model(folder, kind, dtype_, self.device)

    @torch.inference_mode()
    def _forward(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        out = self.model(input_ids=torch.from_numpy(ids).to(self.device),
                         attention_mask=torch.from_numpy(mask).to(self.device))
        tensor = out.logits if self.task == "sequence_classification" else out.last_hidden_state
        return tensor.float().cpu().numpy()


class OnnxBackend(EncoderBackend):
    platform = "onnxruntime"

    def __init__(self, folder: Path, task: str, dtype: str = "") -> None:
        super().__init__(folder, task)
        self.session = onnx_session(folder)
        # What the session really got: a CUDA provider listed as available may still fail to initialise.
        self.providers = self.session.get_providers()
        self.inputs = {i.name for i in self.session.get_inputs()}

    def _forward(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        feed: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.inputs:
            feed["token_type_ids"] = np.zeros_like(ids)
        return self.session.run(None, {k: v for k, v in feed.items() if k in self.inputs})[0]


def default_backend(folder: Path) -> str:
    """The backend a folder runs on when nobody asks for one: ONNX Runtime for an ONNX-only folder (what an
    export publishes), else PyTorch."""
    return OnnxBackend.platform if weights_format(folder) == ONNX else TorchBackend.platform


def open_backend(folder: Path, backend: str, task: str, dtype: str) -> EncoderBackend:
    """`backend` pytorch or onnxruntime; empty: the folder's `default_backend`."""
    if (backend or default_backend(folder)) == OnnxBackend.platform:
        return OnnxBackend(folder, task, dtype)
    return TorchBackend(folder, task, dtype)
