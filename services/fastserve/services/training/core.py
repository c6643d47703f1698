"""The training core: checks a request, queues it, and runs it on a worker. No gRPC here.

`prepare` resolves and checks everything a job needs (dataset and its task, tokenizer, pretrained
model, hyperparameters, an estimate of the memory it needs) so bad requests fail before queueing.
`train` runs one process of a job: in the worker itself, or as one rank of a DDP group. `resume`
queues a new job that goes on from a cancelled or failed job's last checkpoint.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch

from fastserve.models.refs import resolve_dir
from fastserve.runtime import job_queue
from fastserve.runtime.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from fastserve.runtime.jobs import Job, JobState
from fastserve.runtime.stores import Stores
from fastserve.services.training.data import SplitView
from fastserve.services.training.models import DataInfo, build_model, check_memory, estimate_bytes, parameter_count
from fastserve.services.training.spec import TrainingSpec
from fastserve.services.training.trainer import Hooks, Outcome, Trainer
from fastserve.storage.artifacts import Artifact
from fastserve.storage.datasets import DatasetReader

log = logging.getLogger(__name__)

SERVICE = "training"
JOB_TYPE = "training.train"
KEEP_CHECKPOINTS = 2
RESUMABLE = frozenset({JobState.CANCELLED, JobState.FAILED})
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "added_tokens.json")


@dataclass
class Prepared:
    spec: TrainingSpec
    dataset: Artifact
    reader: DatasetReader
    data: DataInfo
    pretrained_dir: Path | None
    tokenizer_dir: Path | None
    parameters: int


class Training:
    def __init__(self, stores: Stores) -> None:
        self.stores = stores

    def prepare(self, params: dict[str, Any]) -> Prepared:
        spec = TrainingSpec.parse(params)
        spec.check()
        dataset = self.stores.artifacts.resolve(spec.dataset_uri, "dataset_uri")
        if dataset.ref.kind != "datasets" or "dataset" not in dataset.manifest.get("metadata", {}):
            raise InvalidArgument(f"{spec.dataset_uri} is not a dataset", field="dataset_uri")
        reader = DatasetReader(dataset.path, dataset.manifest["metadata"])
        spec = spec.for_dataset(reader.task)
        if reader.rows("train") < spec.hyper.batch_size * spec.num_processes:
            raise InvalidArgument(f"the train split has {reader.rows('train')} rows, fewer than one batch of "
                                  f"{spec.hyper.batch_size * spec.num_processes}", field="hyperparameters.batch_size")
        info = reader.info
        data = DataInfo(vocab_size=info["vocab_size"], pad_id=info["pad_id"], eos_id=info["eos_id"],
                        max_length=max(info["max_length"], info.get("max_target_length") or 0),
                        label_map=info.get("label_map", {}))
        pretrained = resolve_dir(self.stores.artifacts, spec.pretrained_uri, "model.pretrained_uri", ("models",)) \
            if spec.pretrained_uri else None
        tokenizer_uri = spec.tokenizer_uri or info.get("tokenizer_uri", "")
        tokenizer = resolve_dir(self.stores.artifacts, tokenizer_uri, "tokenizer_uri") if tokenizer_uri else None
        parameters = parameter_count(spec, data, pretrained)
        check_memory(estimate_bytes(parameters, spec, data), self._memory_budget())
        return Prepared(spec, dataset, reader, data, pretrained, tokenizer, parameters)

    def _memory_budget(self) -> int:
        if self.stores.config.worker_memory_gb:
            return int(self.stores.config.worker_memory_gb * 2**30)
        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory
        return psutil.virtual_memory().total

    def submit(self, params: dict[str, Any], request_id: str = "") -> Job:
        prepared = self.prepare(params)
        # The job records the task it trains, also when it was the dataset's, and the dataset version it
        # reads (not `latest`): its params then say what it did, and a resume of it (after a cancel or a
        # lost worker) reads the same data from the checkpoint's position.
        return job_queue.submit(self.stores, SERVICE, JOB_TYPE, {**params, "task": prepared.spec.task,
                                                                 "dataset_uri": prepared.dataset.ref.uri},
                                request_id)

    def resume(self, job_id: str, max_steps: int = 0) -> Job:
        """Queue a new job with the params of cancelled or failed job `job_id` that starts from its last
        checkpoint; `max_steps` (0: the old job's limit) is the new total, counted from step 0."""
        old = self.stores.jobs.get(job_id)
        if old.service != SERVICE or old.job_type != JOB_TYPE:
            raise NotFound(f"no {SERVICE} job {job_id!r}")
        if old.state not in RESUMABLE:
            raise FailedPrecondition(f"job {job_id} is {old.state.value}; only a CANCELLED or FAILED job can be "
                                     "resumed")
        versions = self.stores.artifacts.versions("checkpoints", job_id)
        if not versions:
            raise FailedPrecondition(f"job {job_id} has no checkpoint to resume from: it ended before saving one")
        if not 0 <= max_steps <= 10**9:
            raise InvalidArgument("max_steps must be in [0, 1e9] (0: the old job's)", field="max_steps")
        params = copy.deepcopy(old.params)
        if max_steps:
            # The new limit alone decides where training ends, so an epoch count cannot cut it short.
            params.setdefault("hyperparameters", {}).update(max_steps=max_steps, epochs=0)
        params["resumed_from"] = job_id
        params["resume_checkpoint"] = f"artifact://checkpoints/{job_id}/{versions[-1]}"
        return self.submit(params)

    # -- running ---------------------------------------------------------------------------------

    def latest_checkpoint(self, job_id: str) -> Path | None:
        versions = self.stores.artifacts.versions("checkpoints", job_id)
        return self.stores.artifacts.resolve(f"artifact://checkpoints/{job_id}/{versions[-1]}").path \
            if versions else None

    def _resume_checkpoint(self, spec: TrainingSpec) -> Path | None:
        """The other job's checkpoint this one was asked to start from, if any."""
        if not spec.resume_checkpoint:
            return None
        try:
            return self.stores.artifacts.resolve(spec.resume_checkpoint).path
        except NotFound:
            raise FailedPrecondition(f"{spec.resume_checkpoint}, the checkpoint to resume from, was deleted") from None

    def publish_checkpoint(self, job_id: str, step: int, write: Callable[[Path], None]) -> str:
        """A checkpoint as artifact `checkpoints/<job id>/<step>`; only the newest few are kept."""
        store = self.stores.artifacts
        try:
            with store.publish("checkpoints", job_id, metadata={"step": step}, version=step) as draft:
                write(draft.path)
        except AlreadyExists:
            pass  # this step was saved before the worker was lost
        for old in store.versions("checkpoints", job_id)[:-KEEP_CHECKPOINTS]:
            store.delete("checkpoints", job_id, old)
        return f"artifact://checkpoints/{job_id}/{step}"

    def train(self, prepared: Prepared, job_id: str, hooks: Hooks, rank: int = 0,
              world: int = 1) -> tuple[torch.nn.Module, Outcome]:
        """Train (or resume) one process of job `job_id` to its end; returns the model and the outcome."""
        spec = prepared.spec
        device = torch.device(f"cuda:{rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu")
        model = build_model(spec, prepared.data, prepared.pretrained_dir).to(device)
        validation = SplitView(prepared.reader, "validation")
        trainer = Trainer(model, spec.task, spec.hyper, SplitView(prepared.reader, "train"),
                          validation if validation.rows else None, prepared.data.pad_id, device, rank, world)
        # Each rank's dropout stream; a checkpoint's RNG states replace it, so that a resumed run draws the
        # masks the uninterrupted run would have (seeding after the resume threw them away).
        torch.manual_seed(spec.hyper.seed + rank)
        # Its own checkpoint first: a resumed job whose worker died goes on from where it got to.
        checkpoint = self.latest_checkpoint(job_id) or self._resume_checkpoint(spec)
        if checkpoint is not None:
            trainer.resume(checkpoint)
            log.info("job %s resumes from step %d", job_id, trainer.step)
        outcome = trainer.run(hooks)
        outcome.metrics["resumed_from_step"] = int(checkpoint.name) if checkpoint else 0
        return model, outcome

    def publish_model(self, prepared: Prepared, model: torch.nn.Module, outcome: Outcome,
                      job_id: str) -> dict[str, Any]:
        """The final model as `models/<output_name>/<next version>`: weights, config, tokenizer, metrics."""
        spec = prepared.spec
        metrics = {k: v for k, v in outcome.metrics.items() if isinstance(v, int | float)}
        with self.stores.artifacts.publish("models", spec.output_name) as draft:
            model.save_pretrained(str(draft.path))
            if prepared.tokenizer_dir is not None:
                for name in TOKENIZER_FILES:
                    if (prepared.tokenizer_dir / name).is_file():
                        shutil.copy(prepared.tokenizer_dir / name, draft.path / name)
            (draft.path / "metrics.json").write_text(json.dumps({"final": metrics, "history": outcome.history}))
            draft.metadata["model"] = {
                "task": spec.task, "family": spec.architecture.family if spec.architecture else "pretrained",
                "pretrained_uri": spec.pretrained_uri, "parameters": prepared.parameters,
                "dataset_uri": prepared.dataset.ref.uri, "label_map": prepared.data.label_map,
                "job_id": job_id, "steps": outcome.steps, "metrics": metrics}
        return {"model_uri": draft.ref.uri, "steps": outcome.steps, "early_stopped": outcome.early_stopped,
                "parameters": prepared.parameters, "metrics": metrics,
                "checkpoint": (f"artifact://checkpoints/{job_id}/{v[-1]}"
                               if (v := self.stores.artifacts.versions("checkpoints", job_id)) else "")}
