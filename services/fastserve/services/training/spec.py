"""What a training job is asked to do, as typed settings with their defaults, checked before queueing.

The job parameters are plain JSON (they travel through Celery and the job store); `TrainingSpec.parse`
turns them into these dataclasses, and `check` refuses anything out of range, naming the request field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from fastserve.runtime.errors import InvalidArgument
from fastserve.storage.artifacts import check_name

FAMILIES = ("gpt2", "llama", "bert", "t5")
TASKS = ("causal_lm", "sequence_classification", "seq2seq")
SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Which task each family can train.
FAMILY_TASKS = {
    "gpt2": ("causal_lm", "sequence_classification"),
    "llama": ("causal_lm", "sequence_classification"),
    "bert": ("sequence_classification",),
    "t5": ("seq2seq",),
}


@dataclass(frozen=True)
class Architecture:
    family: str
    num_layers: int = 2
    hidden_size: int = 128
    num_heads: int = 4
    intermediate_size: int = 0
    max_position_embeddings: int = 1024
    vocab_size: int = 0
    dropout: float = 0.1

    @property
    def ffn(self) -> int:
        return self.intermediate_size or 4 * self.hidden_size


@dataclass(frozen=True)
class Hyperparameters:
    learning_rate: float
    warmup_steps: int = 0
    lr_schedule: str = "linear"
    weight_decay: float = 0.0
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_steps: int = 0
    epochs: int = 0
    max_grad_norm: float = 0.0
    seed: int = 0
    precision: str = "auto"
    eval_interval_steps: int = 0
    checkpoint_interval_steps: int = 500
    log_interval_steps: int = 10
    early_stopping_patience: int = 0
    eval_batches: int = 0


@dataclass(frozen=True)
class TrainingSpec:
    task: str
    dataset_uri: str
    output_name: str
    hyper: Hyperparameters
    architecture: Architecture | None = None
    pretrained_uri: str = ""
    tokenizer_uri: str = ""
    num_processes: int = 1
    # A checkpoint of another job to start from (`ResumeTrainingJob`); the job's own checkpoints come first.
    resume_checkpoint: str = ""

    @classmethod
    def parse(cls, params: dict[str, Any]) -> TrainingSpec:
        model = params.get("model") or {}
        arch = model.get("architecture")
        architecture = None
        if arch is not None:
            architecture = Architecture(
                family=arch.get("family", ""), num_layers=int(arch.get("num_layers") or 2),
                hidden_size=int(arch.get("hidden_size") or 128), num_heads=int(arch.get("num_heads") or 4),
                intermediate_size=int(arch.get("intermediate_size") or 0),
                max_position_embeddings=int(arch.get("max_position_embeddings") or 1024),
                vocab_size=int(arch.get("vocab_size") or 0),
                dropout=float(arch["dropout"]) if arch.get("dropout") is not None else 0.1)
        pretrained = model.get("pretrained_uri", "")
        h = params.get("hyperparameters") or {}
        hyper = Hyperparameters(
            learning_rate=float(h.get("learning_rate") or (5e-5 if pretrained else 5e-4)),
            warmup_steps=int(h.get("warmup_steps") or 0), lr_schedule=h.get("lr_schedule") or "linear",
            weight_decay=float(h.get("weight_decay") or 0.0), batch_size=int(h.get("batch_size") or 8),
            gradient_accumulation_steps=int(h.get("gradient_accumulation_steps") or 1),
            max_steps=int(h.get("max_steps") or 0), epochs=int(h.get("epochs") or 0),
            max_grad_norm=float(h.get("max_grad_norm") or 0.0), seed=int(h.get("seed") or 0),
            precision=h.get("precision") or "auto", eval_interval_steps=int(h.get("eval_interval_steps") or 0),
            checkpoint_interval_steps=int(h.get("checkpoint_interval_steps") or 500),
            log_interval_steps=int(h.get("log_interval_steps") or 10),
            early_stopping_patience=int(h.get("early_stopping_patience") or 0),
            eval_batches=int(h.get("eval_batches") or 0))
        return cls(task=params.get("task", ""), dataset_uri=params.get("dataset_uri", ""),
                   output_name=params.get("output_name", ""), hyper=hyper, architecture=architecture,
                   pretrained_uri=pretrained, tokenizer_uri=params.get("tokenizer_uri", ""),
                   num_processes=int(params.get("num_processes") or default_processes()),
                   resume_checkpoint=params.get("resume_checkpoint", ""))

    def check(self) -> None:
        """Refuse what cannot run, whatever the dataset; every message names the request field."""
        if self.task and self.task not in TASKS:
            raise InvalidArgument("task must be TRAINING_TASK_CAUSAL_LM, _SEQUENCE_CLASSIFICATION or _SEQ2SEQ "
                                  "(or unset: the dataset's)", field="task")
        if not self.dataset_uri:
            raise InvalidArgument("dataset_uri is required", field="dataset_uri")
        check_name(self.output_name, "output_name")
        if (self.architecture is None) == (not self.pretrained_uri):
            raise InvalidArgument("set exactly one of model.architecture and model.pretrained_uri", field="model")
        if self.architecture is not None:
            _check_architecture(self.architecture)
        _check_hyper(self.hyper)
        if not 1 <= self.num_processes <= 64:
            raise InvalidArgument("num_processes must be in [1, 64] (0 means one per visible GPU, or 1 on CPU)",
                                  field="num_processes")

    def for_dataset(self, dataset_task: str) -> TrainingSpec:
        """This spec with the task the dataset was built for: an unset task is the dataset's, and a task
        set otherwise is refused, as is an architecture that cannot train it."""
        if self.task and self.task != dataset_task:
            raise InvalidArgument(f"the dataset was built for {dataset_task}, not {self.task}; leave task unset "
                                  "to train for the dataset's task", field="task")
        if self.architecture is not None and dataset_task not in FAMILY_TASKS[self.architecture.family]:
            family = self.architecture.family
            raise InvalidArgument(f"{family} models train {' or '.join(FAMILY_TASKS[family])}, not {dataset_task} "
                                  "(the dataset's task)", field="model.architecture.family")
        return replace(self, task=dataset_task)


def default_processes() -> int:
    """What num_processes 0 asks for, on the machine that runs the job: one per visible GPU, else 1."""
    return torch.cuda.device_count() or 1


def _check_architecture(a: Architecture) -> None:
    f = "model.architecture"
    if a.family not in FAMILIES:
        raise InvalidArgument(f"unknown architecture family {a.family!r}; one of {', '.join(FAMILIES)}",
                              field=f"{f}.family")
    for name, value, low, high in (("num_layers", a.num_layers, 1, 128), ("hidden_size", a.hidden_size, 8, 16384),
                                   ("num_heads", a.num_heads, 1, 256),
                                   ("max_position_embeddings", a.max_position_embeddings, 8, 1 << 17)):
        if not low <= value <= high:
            raise InvalidArgument(f"{name} must be in [{low}, {high}]", field=f"{f}.{name}")
    if a.hidden_size % a.num_heads:
        raise InvalidArgument("hidden_size must be divisible by num_heads", field=f"{f}.num_heads")
    if a.intermediate_size < 0 or a.vocab_size < 0:
        raise InvalidArgument("sizes must be >= 0", field=f"{f}.intermediate_size")
    if not 0.0 <= a.dropout < 1.0:
        raise InvalidArgument("dropout must be in [0, 1)", field=f"{f}.dropout")


def _check_hyper(h: Hyperparameters) -> None:
    f = "hyperparameters"
    checks = [
        ("learning_rate", 0 < h.learning_rate <= 1, "must be in (0, 1]"),
        ("warmup_steps", h.warmup_steps >= 0, "must be >= 0"),
        ("lr_schedule", h.lr_schedule in SCHEDULES, f"must be one of {', '.join(SCHEDULES)}"),
        ("weight_decay", 0 <= h.weight_decay < 1, "must be in [0, 1)"),
        ("batch_size", 1 <= h.batch_size <= 4096, "must be in [1, 4096]"),
        ("gradient_accumulation_steps", 1 <= h.gradient_accumulation_steps <= 1024, "must be in [1, 1024]"),
        ("max_steps", 0 <= h.max_steps <= 10**9, "must be in [0, 1e9]"),
        ("epochs", 0 <= h.epochs <= 10**4, "must be in [0, 10000]"),
        ("max_grad_norm", 0 <= h.max_grad_norm < math.inf, "must be finite and >= 0 (0 = no clipping)"),
        # torch and numpy seed generators take 32 bits; a larger seed would fail on the worker.
        ("seed", 0 <= h.seed < 2**32, "must be in [0, 2**32)"),
        ("precision", h.precision in PRECISIONS, "must be fp32, bf16 or fp16"),
        ("eval_interval_steps", h.eval_interval_steps >= 0, "must be >= 0"),
        ("checkpoint_interval_steps", h.checkpoint_interval_steps >= 1, "must be >= 0"),
        ("log_interval_steps", h.log_interval_steps >= 1, "must be >= 0"),
        ("early_stopping_patience", h.early_stopping_patience >= 0, "must be >= 0"),
        ("eval_batches", h.eval_batches >= 0, "must be >= 0"),
    ]
    for name, ok, problem in checks:
        if not ok:
            raise InvalidArgument(f"{name} {problem}", field=f"{f}.{name}")
