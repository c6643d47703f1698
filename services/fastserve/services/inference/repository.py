"""The model repository: models and versions loaded and unloaded at run time, each with its batcher.

A version is READY only once loaded and warmed. Requests without a version go to the newest READY
one. Loading a new version of a served model swaps without losing a request: the new version loads
and warms while the old one serves, then takes the traffic, then the old one drains (finishes what
it queued) and unloads. A load without settings keeps those the name is served with; a backend or
task nobody asked for is read from the folder (an ONNX-only folder runs on ONNX Runtime).

A version that failed to load stays listed, FAILED with its error, until it is loaded again or
unloaded; requests to it get FAILED_PRECONDITION at once (retrying cannot help), while LOADING and
UNLOADING, which pass by themselves, are UNAVAILABLE.
"""

from __future__ import annotations

import difflib
import enum
import logging
import math
import re
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Histogram

from fastserve.models.encoders import EncoderBackend, OnnxBackend, TorchBackend, default_backend, open_backend
from fastserve.models.kinds import default_task
from fastserve.models.loading import ONNX, ONNX_FILE, folder_errors, weights_format
from fastserve.models.refs import BUILTIN, BUILTIN_MODELS, resolve_dir
from fastserve.runtime.errors import (
    FailedPrecondition,
    FastServeError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    error_gist,
)
from fastserve.services.inference.batcher import BatchingSettings, DynamicBatcher, Work
from fastserve.services.inference.compute import on_compute_thread, on_loader_thread
from fastserve.services.inference.generation_settings import GenerationSettings
from fastserve.services.inference.generator import GenerationRequest, Generator
from fastserve.services.inference.sampling_params import SamplingParams
from fastserve.storage.artifacts import ArtifactStore, check_name

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
_SERIES = (QUEUE_SECONDS, COMPUTE_SECONDS, BATCH_SIZE, REQUESTS, FAILURES)

# Model versions loaded, loading or draining at once (FAILED ones hold no weights and do not count):
# FASTSERVE_INFERENCE_MAX_MODELS, this by default.
MAX_MODELS = 16
VERSION = re.compile(r"[A-Za-z0-9._-]{1,32}")  # numeric versions: ASCII digits only (see _version_key)


class State(enum.StrEnum):
    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
    FAILED = "FAILED"


@dataclass(frozen=True)
class ModelSettings:
    backend: str = ""  # pytorch or onnxruntime; empty: the folder's (encoders.default_backend)
    task: str = ""  # empty: the folder's (kinds.default_task)
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
    settings: ModelSettings  # what it runs with: `requested`, with the backend and task it left unset filled in
    requested: ModelSettings  # what the load asked for; a reload without settings asks for these again
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
    def __init__(self, artifacts: ArtifactStore, max_models: int = MAX_MODELS,
                 max_kv_bytes: float = math.inf) -> None:
        self.artifacts = artifacts
        self.max_models, self.max_kv_bytes = max_models, max_kv_bytes  # the second: per generative model
        self.models: dict[str, dict[str, LoadedModel]] = {}
        self.lock = threading.RLock()

    def resolve_uri(self, name: str, uri: str) -> tuple[Path, str, str]:
        """The folder to load, the URI it came from and the version it is."""
        field = "model_uri"
        if not uri:  # the name alone says what to load
            field, uri = "name", f"{BUILTIN}{name}" if name in BUILTIN_MODELS else f"artifact://models/{name}/latest"
        folder = resolve_dir(self.artifacts, uri, field, ("models",))
        if uri.startswith(BUILTIN):
            return folder, uri, "1"
        artifact = self.artifacts.resolve(uri, field)
        return folder, artifact.ref.uri, str(artifact.ref.version)

    def served_settings(self, name: str) -> ModelSettings:
        """What a load of `name` without settings asks for: what its newest READY version was loaded with;
        the defaults for a name not served (nor for one whose only versions failed: their settings may be
        why)."""
        with self.lock:
            ready = [m for m in self.models.get(name, {}).values() if m.state is State.READY]
        newest = max(ready, key=lambda m: _version_key(m.version), default=None)
        return newest.requested if newest else ModelSettings()

    def load(self, name: str, uri: str = "", version: str = "", settings: ModelSettings | None = None) -> LoadedModel:
        """Load, warm and start serving a model version; older versions of the name then drain.

        `settings` None (the request had no config): `served_settings`, so a reload keeps its scheduling,
        batching, dtype, backend and task. A READY version loaded again with other settings loads anew
        beside the one serving, which drains once the new one has taken over."""
        if not name:
            raise InvalidArgument("name is required", field="name")
        check_name(name, "name")
        check_version(version)
        folder, uri, found_version = self.resolve_uri(name, uri)
        version = version or found_version
        requested = self.served_settings(name) if settings is None else settings
        entry = LoadedModel(name, version, uri, requested, requested)
        with self.lock:
            current = self.models.get(name, {}).get(version)
            if current is not None and current.state in (State.LOADING, State.READY):
                if current.requested == requested:
                    return current
                if current.state is State.LOADING:
                    raise Unavailable(f"model {name} version {version} is loading with other settings; load it "
                                      "again once it is READY")
            self._check_room(name, version)
            if not folder.is_dir():
                # Deleted since it was resolved: a delete checks what is loaded under this lock, so once the
                # entry below is in, none can go through.
                raise NotFound(f"{uri} was deleted while the load began", field="model_uri")
            beside = current is not None and current.state is State.READY
            if not beside:  # a FAILED or UNLOADING entry gives way to this load
                self.models.setdefault(name, {})[version] = entry
        label = f"model {name} version {version} ({uri})"
        try:
            entry.settings = _effective(folder, requested, label)
            if entry.settings.task == "generation":
                entry.backend = _open_generator(f"{name}/{version}", folder, entry.settings, self.max_kv_bytes)
            else:
                entry.backend = on_loader_thread(open_backend, folder, entry.settings.backend, entry.settings.task,
                                                 entry.settings.dtype)
                entry.batcher = DynamicBatcher(f"{name}/{version}", _runner(entry.backend),
                                               entry.settings.batching, entry.observe, compute=on_compute_thread)
                encoded = entry.backend.encoder.encode(["warm up the model"], truncate=True)
                entry.batcher.submit(encoded.ids, 1, encoded.longest).result(timeout=120)
        except FastServeError as exc:
            self._failed(entry, exc.message)
            raise
        except folder_errors() as exc:
            # The folder, not the request, is at fault (a truncated file, weights that do not fit); the
            # traceback stays in the log in case it is a bug after all.
            error = FailedPrecondition(f"{label} cannot load: {type(exc).__name__}: {error_gist(exc)}")
            self._failed(entry, error.message, exc)
            raise error from None
        except Exception as exc:
            self._failed(entry, f"internal error: {type(exc).__name__}")  # INTERNAL; the interceptor logs it
            raise
        self._take_over(entry)
        log.info("model %s version %s READY (%s, %s, %s)", name, version, entry.backend.platform, entry.task, uri)
        self._retire_older(name, version)
        return entry

    def _check_room(self, name: str, version: str) -> None:
        """Refuse a load past `max_models` versions (under the lock). A new version of a served name replaces
        its READY versions, so it counts only against the other names (and this name's other loads)."""
        held = sum(1 for versions in self.models.values() for m in versions.values()
                   if m.state is not State.FAILED and
                   (m.name != name or (m.state is State.LOADING and m.version != version)))
        if held >= self.max_models:
            raise ResourceExhausted(f"{held} model versions are loaded, the most this server holds "
                                    f"({self.max_models}, FASTSERVE_INFERENCE_MAX_MODELS); unload one first")

    def _failed(self, entry: LoadedModel, error: str, cause: BaseException | None = None) -> None:
        entry.state, entry.error = State.FAILED, error
        _stop(entry)
        log.warning("loading %s/%s failed: %s", entry.name, entry.version, error, exc_info=cause)

    def _take_over(self, entry: LoadedModel) -> None:
        """Make a warmed entry the one its version serves; one it replaces (same version, other settings) drains."""
        with self.lock:
            if entry.state is not State.LOADING:  # unloaded while it loaded
                replaced, unloaded = None, True
            else:
                versions = self.models.setdefault(entry.name, {})
                replaced, unloaded = versions.get(entry.version), False
                versions[entry.version] = entry
                entry.state = State.READY
                if replaced is entry:
                    replaced = None
                elif replaced is not None:
                    replaced.state = State.UNLOADING
        if unloaded:
            _stop(entry)
            raise FailedPrecondition(f"model {entry.name} version {entry.version} was unloaded while it loaded")
        if replaced is not None:
            self._drain(replaced)

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
            removed = versions.get(model.version) is model
            if removed:
                del versions[model.version]
            if not versions:
                self.models.pop(model.name, None)
            if removed:
                self._remove_series(model, list(versions.values()))
        log.info("model %s version %s unloaded", model.name, model.version)

    @staticmethod
    def _remove_series(model: LoadedModel, others: list[LoadedModel]) -> None:
        """Drop an unloaded version's metric series (under the lock), unless another entry of the name still
        uses them: one loaded again beside it with other settings shares (name, version); an engine's series
        are labelled by name and policy, shared by every version with that policy."""
        if not any(m.version == model.version for m in others):
            for metric in _SERIES:
                try:
                    metric.remove(model.name, model.version)
                except KeyError:  # never observed
                    pass
        if isinstance(model.backend, Generator):
            metrics = model.backend.engine.metrics
            if not any(isinstance(m.backend, Generator) and m.backend.engine.metrics.labels == metrics.labels
                       for m in others):
                metrics.remove()

    def unload(self, name: str, version: str = "") -> list[str]:
        with self.lock:
            versions = self.models.get(name)
            if not versions:
                raise NotFound(f"model {name!r} is not loaded{self._close_name(name)}")
            if version and version not in versions:
                raise NotFound(f"model {name!r} has no version {version!r}; loaded: {_listed(versions)}")
            doomed = [versions[version]] if version else list(versions.values())
            for model in doomed:
                model.state = State.UNLOADING
        for model in doomed:
            self._drain(model)
        return [m.version for m in doomed]

    def get(self, name: str, version: str = "") -> LoadedModel:
        """The READY model to serve a request: NOT_FOUND if unknown (with the closest served name),
        FAILED_PRECONDITION if it failed to load, UNAVAILABLE while it loads or unloads."""
        with self.lock:
            versions = self.models.get(name)
            if not versions:
                raise NotFound(f"model {name!r} is not loaded{self._close_name(name)}")
            if version:
                model = versions.get(version)
                if model is None:
                    raise NotFound(f"model {name!r} has no version {version!r}; loaded: {_listed(versions)}")
            else:  # the newest READY one; else the one whose state tells the caller most
                model = max(versions.values(), key=lambda m: (_PREFERENCE[m.state], _version_key(m.version)))
        if model.state is State.FAILED:
            raise FailedPrecondition(f"model {name} version {model.version} failed to load: {model.error}; load it "
                                     "again or unload it")
        if model.state is not State.READY:
            raise Unavailable(f"model {name} version {model.version} is {model.state.value.lower()}")
        return model

    def _close_name(self, name: str) -> str:
        """`; did you mean '<name>'?` for the served name closest to a mistyped one, or ''."""
        close = difflib.get_close_matches(name, list(self.models), n=1)
        return f"; did you mean {close[0]!r}?" if close else ""

    def all(self) -> list[LoadedModel]:
        with self.lock:
            return sorted((m for versions in self.models.values() for m in versions.values()),
                          key=lambda m: (m.name, _version_key(m.version)))


def _effective(folder: Path, requested: ModelSettings, label: str) -> ModelSettings:
    """`requested` with its unset backend and task read from the folder, refused where the folder cannot
    run on the backend: the request may be sound and the artifact unusable for it (FailedPrecondition)."""
    task = requested.task or default_task(folder)
    onnx_only = weights_format(folder) == ONNX
    if task == "generation":
        if requested.backend == OnnxBackend.platform:  # never possible, whatever the folder
            raise InvalidArgument("generation runs on the PyTorch backend", field="config.backend")
        if onnx_only:
            raise FailedPrecondition(f"{label} holds only an ONNX graph; generation runs on PyTorch weights: serve "
                                     "the model it was exported from")
        return replace(requested, backend=TorchBackend.platform, task=task)
    backend = requested.backend or default_backend(folder)
    if backend == TorchBackend.platform and onnx_only:
        raise FailedPrecondition(f"config.backend asks for PyTorch, but {label} holds only an ONNX graph "
                                 f"({ONNX_FILE}, no PyTorch weights): leave config.backend unset or ask for ONNX "
                                 "Runtime", field="config.backend")
    if backend == OnnxBackend.platform and not (folder / ONNX_FILE).is_file():
        raise FailedPrecondition(f"config.backend asks for ONNX Runtime, but {label} has no {ONNX_FILE}: leave "
                                 "config.backend unset or export the model to ONNX first", field="config.backend")
    return replace(requested, backend=backend, task=task)


def _open_generator(name: str, folder: Path, settings: ModelSettings, max_kv_bytes: float) -> Generator:
    generator = on_loader_thread(Generator, name, folder, settings.dtype, settings.generation, max_kv_bytes)
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


def check_version(version: str, field: str = "version") -> None:
    """An explicit serving version: 1-32 letters, digits, '.', '_' or '-' (empty: the artifact's)."""
    if version and not VERSION.fullmatch(version):
        raise InvalidArgument(f"version {version!r} must be 1-32 ASCII letters, digits, '.', '_' or '-'",
                              field=field)


def _version_key(version: str) -> tuple[int, str]:
    # str.isdigit alone accepts '²' and '١', which int() refuses or reads as another number.
    return (int(version), "") if version.isascii() and version.isdigit() else (-1, version)


# Which version a request without one is told about when none is READY: a loading one (it will be
# READY soon), then a failed one (the caller must act), then one on its way out.
_PREFERENCE = {State.READY: 3, State.LOADING: 2, State.FAILED: 1, State.UNLOADING: 0}


def _listed(versions: dict[str, LoadedModel]) -> str:
    return ", ".join(sorted(versions, key=_version_key))
