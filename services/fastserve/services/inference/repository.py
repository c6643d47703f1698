"""The model repository: models and versions loaded and unloaded at run time, each with its batcher.

A version is READY only once loaded and warmed. Requests without a version go to the newest READY
one. Loading a new version of a served model swaps without losing a request: the new version loads
and warms while the old one serves, then takes the traffic, then the old one drains (finishes what
it queued) and unloads.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Histogram

from fastserve.models.encoders import EncoderBackend, open_backend
from fastserve.models.kinds import default_task
from fastserve.models.refs import BUILTIN, BUILTIN_MODELS, resolve_dir
from fastserve.runtime.errors import InvalidArgument, NotFound, Unavailable
from fastserve.services.inference.batcher import BatchingSettings, DynamicBatcher, Work
from fastserve.services.inference.compute import on_compute_thread
from fastserve.services.inference.generation_settings import GenerationSettings
from fastserve.services.inference.generator import GenerationRequest, Generator
from fastserve.services.inference.sampling_params import SamplingParams
from fastserve.storage.artifacts import ArtifactStore

log = logging.getLogger(__name__)

QUEUE_SECONDS = Histogram("fastserve_inference_queue_seconds", "Time requests wait before their batch runs.",
                          ["model", "version"], buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                                         0.25, 0.5, 1, 2.5))
COMPUTE_SECONDS = Histogram("fastserve_inference_compute_seconds", "Time to run one batch.", ["model", "version"],
                            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
BATCH_SIZE = Histogram("fastserve_inference_batch_size", "Inputs per executed batch.", ["model", "version"],
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
REQUESTS = Counter("fastserve_inference_requests", "Inference requests.", ["model", "version"])
FAILURES = Counter("fastserve_inference_failures", "Inference requests that failed.", ["model", "version"])


class State(enum.StrEnum):
    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
    FAILED = "FAILED"


@dataclass(frozen=True)
class ModelSettings:
    backend: str = "pytorch"  # or onnxruntime
    task: str = ""  # empty: inferred from the model
    dtype: str = ""
    batching: BatchingSettings = field(default_factory=BatchingSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)


@dataclass
class Statistics:
    requests: int = 0
    failures: int = 0
    inferences: int = 0
    batches: int = 0
    queue_ms: float = 0.0
    compute_ms: float = 0.0
    batch_sizes: dict[int, int] = field(default_factory=dict)


@dataclass
class LoadedModel:
    name: str
    version: str
    uri: str
    settings: ModelSettings
    state: State = State.LOADING
    error: str = ""
    backend: EncoderBackend | Generator | None = None
    batcher: DynamicBatcher | None = None  # encoders; a Generator has its own engine
    stats: Statistics = field(default_factory=Statistics)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def task(self) -> str:
        return self.backend.task if self.backend else self.settings.task

    def observe(self, batch: list[Work], seconds: float) -> None:
        now = time.monotonic()
        size = sum(w.size for w in batch)
        labels = (self.name, self.version)
        COMPUTE_SECONDS.labels(*labels).observe(seconds)
        BATCH_SIZE.labels(*labels).observe(size)
        with self.lock:
            self.stats.batches += 1
            self.stats.inferences += size
            self.stats.compute_ms += seconds * 1e3
            self.stats.batch_sizes[size] = self.stats.batch_sizes.get(size, 0) + 1
            for work in batch:
                waited = max(now - seconds - work.enqueued, 0.0)
                self.stats.queue_ms += waited * 1e3
                QUEUE_SECONDS.labels(*labels).observe(waited)

    def statistics(self) -> Statistics:
        """A copy of the figures; for a generative model an inference is a generated token and a batch
        is an engine step."""
        with self.lock:
            stats = Statistics(**{**vars(self.stats), "batch_sizes": dict(self.stats.batch_sizes)})
        if isinstance(self.backend, Generator):
            steps = self.backend.engine.stats
            stats.inferences, stats.batches = steps.tokens, steps.steps
            stats.compute_ms, stats.batch_sizes = steps.compute_s * 1e3, dict(steps.batch_sizes)
        return stats

    def count(self, failed: bool) -> None:
        REQUESTS.labels(self.name, self.version).inc()
        with self.lock:
            self.stats.requests += 1
            if failed:
                self.stats.failures += 1
                FAILURES.labels(self.name, self.version).inc()


class ModelRepository:
    def __init__(self, artifacts: ArtifactStore) -> None:
        self.artifacts = artifacts
        self.models: dict[str, dict[str, LoadedModel]] = {}
        self.lock = threading.RLock()

    def resolve_uri(self, name: str, uri: str) -> tuple[Path, str, str]:
        """The folder to load, the URI it came from and the version it is."""
        if not uri:
            uri = f"{BUILTIN}{name}" if name in BUILTIN_MODELS else f"artifact://models/{name}/latest"
        folder = resolve_dir(self.artifacts, uri, "model_uri", ("models",))
        if uri.startswith(BUILTIN):
            return folder, uri, "1"
        artifact = self.artifacts.resolve(uri, "model_uri")
        return folder, artifact.ref.uri, str(artifact.ref.version)

    def load(self, name: str, uri: str = "", version: str = "", settings: ModelSettings | None = None) -> LoadedModel:
        """Load, warm and start serving a model version; older versions of the name then drain."""
        if not name:
            raise InvalidArgument("name is required", field="name")
        settings = settings or ModelSettings()
        folder, uri, found_version = self.resolve_uri(name, uri)
        version = version or found_version
        entry = LoadedModel(name, version, uri, settings)
        with self.lock:
            versions = self.models.setdefault(name, {})
            current = versions.get(version)
            if current is not None and current.state in (State.LOADING, State.READY):
                return current
            versions[version] = entry
        try:
            task = settings.task or default_task(folder)
            if task == "generation":
                entry.backend = _open_generator(f"{name}/{version}", folder, settings)
            else:
                entry.backend = on_compute_thread(open_backend, folder, settings.backend, task, settings.dtype)
                entry.batcher = DynamicBatcher(f"{name}/{version}", _runner(entry.backend), settings.batching,
                                               entry.observe)
                encoded = entry.backend.encoder.encode(["warm up the model"], truncate=True)
                entry.batcher.submit(encoded.ids, 1, encoded.longest).result(timeout=120)
        except Exception as exc:
            entry.state, entry.error = State.FAILED, str(getattr(exc, "message", exc))
            _stop(entry)
            log.warning("loading %s/%s failed: %s", name, version, entry.error)
            raise
        entry.state = State.READY
        log.info("model %s version %s READY (%s, %s, %s)", name, version, entry.backend.platform, entry.task, uri)
        self._retire_older(name, version)
        return entry

    def _retire_older(self, name: str, version: str) -> None:
        with self.lock:
            older = [m for v, m in self.models.get(name, {}).items() if v != version and m.state is State.READY]
            for model in older:
                model.state = State.UNLOADING
        for model in older:
            self._drain(model)

    def _drain(self, model: LoadedModel) -> None:
        _stop(model)
        with self.lock:
            versions = self.models.get(model.name, {})
            if versions.get(model.version) is model:
                del versions[model.version]
            if not versions:
                self.models.pop(model.name, None)
        log.info("model %s version %s unloaded", model.name, model.version)

    def unload(self, name: str, version: str = "") -> list[str]:
        with self.lock:
            versions = self.models.get(name)
            if not versions or (version and version not in versions):
                raise NotFound(f"model {name}{'/' + version if version else ''} is not loaded")
            doomed = [versions[version]] if version else list(versions.values())
            for model in doomed:
                model.state = State.UNLOADING
        for model in doomed:
            self._drain(model)
        return [m.version for m in doomed]

    def get(self, name: str, version: str = "") -> LoadedModel:
        """The READY model to serve a request; NOT_FOUND if unknown, UNAVAILABLE if not ready."""
        with self.lock:
            versions = self.models.get(name)
            if not versions:
                raise NotFound(f"model {name!r} is not loaded")
            if version:
                model = versions.get(version)
                if model is None:
                    raise NotFound(f"model {name!r} has no version {version!r}")
            else:
                ready = [m for m in versions.values() if m.state is State.READY]
                model = max(ready, key=lambda m: _version_key(m.version)) if ready else next(iter(versions.values()))
            if model.state is not State.READY:
                raise Unavailable(f"model {name} version {model.version} is {model.state.value.lower()}")
            return model

    def all(self) -> list[LoadedModel]:
        with self.lock:
            return sorted((m for versions in self.models.values() for m in versions.values()),
                          key=lambda m: (m.name, _version_key(m.version)))

def _open_generator(name: str, folder: Path, settings: ModelSettings) -> Generator:
    if settings.backend != "pytorch":
        raise InvalidArgument("generation runs on the PyTorch backend", field="config.backend")
    generator = on_compute_thread(Generator, name, folder, settings.dtype, settings.generation)
    warm = generator.submit(GenerationRequest(token_ids=[0], params=SamplingParams(max_new_tokens=2),
                                              max_new_tokens_set=True))
    generator.complete(warm, time.monotonic() + 120)
    return generator


def _stop(model: LoadedModel) -> None:
    """Finish what the model has queued or running, then stop its worker threads."""
    if model.batcher:
        model.batcher.drain()
    if isinstance(model.backend, Generator):
        model.backend.drain()


def _runner(backend: EncoderBackend):
    """Run the rows of several requests as one batch and hand each request its own slice back."""
    def run(payloads: list[list[list[int]]]) -> list[Any]:
        outputs = on_compute_thread(backend.run, [row for rows in payloads for row in rows])
        results, start = [], 0
        for rows in payloads:
            results.append(outputs[start:start + len(rows)])
            start += len(rows)
        return results
    return run


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (-1, version)

