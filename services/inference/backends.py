"""Encoder backends: PyTorch (CUDA when present, fp32/bf16/fp16) and ONNX Runtime (its CUDA provider
when the session really has it, else CPU), with the task heads on top: embeddings (mean pooling and
L2 normalisation, as sentence-transformers does for all-MiniLM-L6-v2), sequence classification
(labels and softmax scores), and raw outputs.

Texts are tokenized on the caller's thread when a request arrives (so a too-long text is refused
before it queues); a batch only pads the token ids and runs the model.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer

from services.optimization import prune  # noqa: F401 - registers the model types of head-pruned models
from shared.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)
transformers.utils.logging.disable_progress_bar()  # a server logs lines, not progress bars

TASKS = ("embedding", "sequence_classification", "raw")
DTYPES = {"": torch.float32, "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


@dataclass
class Encoded:
    """One request's texts as token ids."""

    ids: list[list[int]]

    @property
    def longest(self) -> int:
        return max(map(len, self.ids))


def load_fast_tokenizer(folder: Path) -> Tokenizer:
    path = folder / "tokenizer.json"
    if path.is_file():
        return Tokenizer.from_file(str(path))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder)).backend_tokenizer


class TextEncoder:
    """Tokenizes requests: strictly (a text over the window is refused) or truncating."""

    def __init__(self, folder: Path, max_length: int) -> None:
        self.max_length = max_length
        self.strict = load_fast_tokenizer(folder)
        self.strict.no_truncation()
        self.strict.no_padding()
        self.truncating = load_fast_tokenizer(folder)
        self.truncating.no_padding()
        self.truncating.enable_truncation(max_length)
        pad = next((i for t in ("[PAD]", "<pad>") if (i := self.strict.token_to_id(t)) is not None), 0)
        self.pad_id = pad

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


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    weights = mask[..., None].astype(np.float32)
    pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
    return pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)


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
        config = json.loads((folder / "config.json").read_text())
        window = int(min(config.get("max_position_embeddings", 512), 512))
        sbert = folder / "sentence_bert_config.json"
        if sbert.is_file():  # sentence-transformers models declare the window they were trained with
            window = int(json.loads(sbert.read_text()).get("max_seq_length", window))
        self.max_length = window
        self.labels = [config.get("id2label", {}).get(str(i), str(i)) for i in range(len(config.get("id2label", {})))]
        if task == "sequence_classification" and not self.labels:
            raise InvalidArgument(f"{folder.name} has no classification head (no id2label)", field="config.task")
        self.encoder = TextEncoder(folder, self.max_length)
        self.dimension = int(config.get("hidden_size", 0))

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

    def __init__(self, folder: Path, task: str, dtype: str = "", model: torch.nn.Module | None = None) -> None:
        """`model`: an already built module to serve (a torchao-quantized one), instead of loading `folder`'s."""
        super().__init__(folder, task)
        from transformers import AutoModel, AutoModelForSequenceClassification

        if dtype not in DTYPES:
            raise InvalidArgument(f"dtype must be one of fp32, bf16, fp16, got {dtype!r}", field="config.dtype")
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = DTYPES[dtype]
        if torch_dtype is torch.float16 and self.device.type == "cpu":
            raise FailedPrecondition("fp16 needs a GPU; use fp32 or bf16 on CPU")
        auto = AutoModelForSequenceClassification if task == "sequence_classification" else AutoModel
        if model is None and (folder / "quantization.json").is_file():
            from services.optimization.quantize import load_quantized_torch

            model = load_quantized_torch(folder, auto)  # a torchao model from the optimization service
        self.model = (model or auto.from_pretrained(str(folder), dtype=torch_dtype)).to(self.device).eval()

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
        import onnxruntime as ort

        path = folder / "model.onnx"
        if not path.is_file():
            raise InvalidArgument(f"{folder.name} has no model.onnx for the ONNX Runtime backend",
                                  field="config.backend")
        # Ask for CUDA only where there is a GPU: onnxruntime-gpu lists its CUDA provider even without one.
        wanted = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()
                  and (p != "CUDAExecutionProvider" or torch.cuda.is_available())]
        self.session = ort.InferenceSession(str(path), providers=wanted)
        # What the session really got: a CUDA provider listed as available may still fail to initialise.
        self.providers = self.session.get_providers()
        log.info("ONNX Runtime session for %s runs on %s", folder.name, self.providers)
        self.inputs = {i.name for i in self.session.get_inputs()}

    def _forward(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        feed: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.inputs:
            feed["token_type_ids"] = np.zeros_like(ids)
        return self.session.run(None, {k: v for k, v in feed.items() if k in self.inputs})[0]


def open_backend(folder: Path, backend: str, task: str, dtype: str) -> EncoderBackend:
    if backend == "onnxruntime":
        return OnnxBackend(folder, task, dtype)
    return TorchBackend(folder, task, dtype)


def infer_task(folder: Path) -> str:
    """What a model folder serves when the load request does not say: generation for a causal LM or an
    encoder-decoder, a classifier if it has a classification head, else embeddings."""
    config = json.loads((folder / "config.json").read_text())
    architectures = " ".join(config.get("architectures") or [])
    if any(kind in architectures for kind in ("CausalLM", "LMHeadModel", "ForConditionalGeneration")):
        return "generation"
    return "sequence_classification" if "SequenceClassification" in architectures else "embedding"
