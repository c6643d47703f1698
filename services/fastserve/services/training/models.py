"""Building the model a job trains: a transformers architecture from its config, or a pretrained one.

Pretrained models load from local folders only (an artifact or a built-in package): nothing is ever
downloaded. They load through `fastserve.models.loading`, so a folder another service wrote (a head-pruned
model from optimization) trains here too. Memory is estimated from a model built on the meta device, before
any job is queued.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import (
    BertConfig,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    T5Config,
)

from fastserve.models.kinds import CLASSIFIER, DECODER, SEQ2SEQ, auto_class
from fastserve.models.loading import PYTORCH, load_config, load_model, weights_format
from fastserve.runtime.errors import FailedPrecondition, InvalidArgument
from fastserve.services.training.spec import Architecture, TrainingSpec

transformers.utils.logging.disable_progress_bar()  # workers log lines, not progress bars

# The model kind (`fastserve.models.kinds`) each training task builds or loads.
TASK_KINDS = {"causal_lm": DECODER, "sequence_classification": CLASSIFIER, "seq2seq": SEQ2SEQ}
AUTO_CLASSES = {task: auto_class(kind) for task, kind in TASK_KINDS.items()}


@dataclass(frozen=True)
class DataInfo:
    """What the model needs to know of its dataset."""

    vocab_size: int
    pad_id: int
    eos_id: int
    max_length: int
    label_map: dict[str, int]


def architecture_config(a: Architecture, task: str, data: DataInfo) -> PretrainedConfig:
    vocab = a.vocab_size or data.vocab_size
    if vocab < data.vocab_size:
        raise InvalidArgument(f"vocab_size {vocab} is smaller than the dataset's {data.vocab_size}",
                              field="model.architecture.vocab_size")
    if a.max_position_embeddings < data.max_length:
        raise InvalidArgument(f"max_position_embeddings {a.max_position_embeddings} is below the dataset's "
                              f"sequences of {data.max_length}", field="model.architecture.max_position_embeddings")
    special = {"pad_token_id": data.pad_id, "eos_token_id": data.eos_id if data.eos_id >= 0 else None}
    if a.family == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_positions=a.max_position_embeddings, n_embd=a.hidden_size,
                            n_layer=a.num_layers, n_head=a.num_heads, n_inner=a.ffn, resid_pdrop=a.dropout,
                            embd_pdrop=a.dropout, attn_pdrop=a.dropout, bos_token_id=special["eos_token_id"],
                            **special)
    elif a.family == "llama":
        config = LlamaConfig(vocab_size=vocab, hidden_size=a.hidden_size, intermediate_size=a.ffn,
                             num_hidden_layers=a.num_layers, num_attention_heads=a.num_heads,
                             num_key_value_heads=a.num_heads, max_position_embeddings=a.max_position_embeddings,
                             attention_dropout=a.dropout, bos_token_id=special["eos_token_id"], **special)
    elif a.family == "bert":
        config = BertConfig(vocab_size=vocab, hidden_size=a.hidden_size, num_hidden_layers=a.num_layers,
                            num_attention_heads=a.num_heads, intermediate_size=a.ffn,
                            max_position_embeddings=a.max_position_embeddings, hidden_dropout_prob=a.dropout,
                            attention_probs_dropout_prob=a.dropout, pad_token_id=data.pad_id)
    else:
        config = T5Config(vocab_size=vocab, d_model=a.hidden_size, d_kv=a.hidden_size // a.num_heads, d_ff=a.ffn,
                          num_layers=a.num_layers, num_decoder_layers=a.num_layers, num_heads=a.num_heads,
                          dropout_rate=a.dropout, decoder_start_token_id=data.pad_id, **special)
    _label_config(config, task, data)
    return config


def _label_config(config: PretrainedConfig, task: str, data: DataInfo) -> None:
    if task == "sequence_classification":
        config.num_labels = len(data.label_map)
        config.id2label = {i: label for label, i in data.label_map.items()}
        config.label2id = dict(data.label_map)


def build_model(spec: TrainingSpec, data: DataInfo, pretrained_dir: Path | None) -> PreTrainedModel:
    """A fresh model, seeded, in fp32 (autocast handles lower precision)."""
    torch.manual_seed(spec.hyper.seed)
    auto = AUTO_CLASSES[spec.task]
    if pretrained_dir is None:
        return auto.from_config(architecture_config(spec.architecture, spec.task, data))
    config = pretrained_config(spec, pretrained_dir)
    _label_config(config, spec.task, data)
    if config.pad_token_id is None:
        config.pad_token_id = data.pad_id
    return load_model(pretrained_dir, TASK_KINDS[spec.task], dtype=torch.float32, field="model.pretrained_uri",
                      config=config, ignore_mismatched_sizes=spec.task == "sequence_classification")


def pretrained_config(spec: TrainingSpec, pretrained_dir: Path) -> PretrainedConfig:
    """The pretrained folder's config, refused if its weights cannot be trained."""
    if weights_format(pretrained_dir) != PYTORCH:  # a torchao or ONNX model has no trainable weights
        raise InvalidArgument(f"{spec.pretrained_uri} is a {weights_format(pretrained_dir)} model; fine-tune "
                              "a PyTorch model", field="model.pretrained_uri")
    return load_config(pretrained_dir, field="model.pretrained_uri")


def parameter_count(spec: TrainingSpec, data: DataInfo, pretrained_dir: Path | None) -> int:
    """Parameters of the model, counted on the meta device: no memory is used."""
    with torch.device("meta"):
        if pretrained_dir is None:
            model = AUTO_CLASSES[spec.task].from_config(architecture_config(spec.architecture, spec.task, data))
        else:
            config = pretrained_config(spec, pretrained_dir)
            _label_config(config, spec.task, data)
            model = AUTO_CLASSES[spec.task].from_config(config)
    return sum(p.numel() for p in model.parameters())


def estimate_bytes(params: int, spec: TrainingSpec, data: DataInfo) -> int:
    """fp32 weights, gradients and AdamW's two moments (16 bytes a parameter), plus activations: about
    34 values per token per hidden unit per layer (Korthikanti et al.), at fp32."""
    a = spec.architecture
    hidden, layers = (a.hidden_size, a.num_layers) if a else (384, 12)
    tokens = spec.hyper.batch_size * data.max_length
    return params * 16 + tokens * hidden * layers * 34 * 4


def check_memory(need: int, available: int) -> None:
    if need > available:
        raise FailedPrecondition(f"the model needs about {need / 2**30:.1f} GiB to train at this batch size; "
                                 f"a worker has {available / 2**30:.1f} GiB (set FASTSERVE_WORKER_MEMORY_GB, "
                                 "lower batch_size or shrink the model)")
