"""The inference core: the request path from texts to task outputs. No gRPC here.

A request is tokenized on its own thread (bad input fails before it queues), queued on its model's
batcher, and awaited until its deadline; a caller that cancels or times out drops its queued work.
A generation request goes to its model's engine instead and is answered whole or as a stream.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from fastserve.runtime.config import Config
from fastserve.runtime.errors import Cancelled, DeadlineExceeded, InvalidArgument, Unavailable
from fastserve.services.inference.generator import Chunk, Completion, GenerationRequest, Usage
from fastserve.services.inference.repository import LoadedModel, ModelRepository
from fastserve.services.inference.sequence import Sequence

log = logging.getLogger(__name__)

MAX_TEXTS = 1024


@dataclass
class Result:
    model: LoadedModel
    outputs: Any  # embeddings [n, dim], probabilities [n, labels], or raw hidden states
    tokens: int = 0  # of all the texts as the model read them (after truncation, special tokens included)


class Inference:
    def __init__(self, repository: ModelRepository) -> None:
        self.repository = repository

    def load_configured(self, config: Config) -> None:
        """Load the models `FASTSERVE_INFERENCE_MODELS` names (`name=uri`, comma-separated)."""
        if config.inference_models.strip().lower() == "none":
            return
        for entry in filter(None, (e.strip() for e in config.inference_models.split(","))):
            name, _, uri = entry.partition("=")
            try:
                self.repository.load(name.strip(), uri.strip())  # backend and task: the folder's
            except Exception:  # noqa: BLE001 - one bad model must not keep the others from serving
                log.exception("could not load configured model %s", entry)

    def run(self, name: str, version: str, texts: list[str], truncate: bool = False, priority: int = 0,
            deadline: float | None = None, task: str = "",
            bind: Callable[[Future], None] = lambda future: None) -> Result:
        if len(texts) > MAX_TEXTS:
            raise InvalidArgument(f"at most {MAX_TEXTS} texts a request", field="texts")
        for attempt in range(2):
            model = self.repository.get(name, version)
            if task and model.task != task:
                raise InvalidArgument(f"model {name} serves {model.task}, not {task}", field="model")
            encoded = model.backend.encoder.encode(texts, truncate)
            try:
                future = model.batcher.submit(encoded.ids, len(texts), encoded.longest, priority, deadline)
            except Unavailable:
                if version or attempt:
                    raise
                continue  # the version retired between lookup and submit: the newer one takes it
            break
        bind(future)
        failed = True
        try:
            timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            outputs = future.result(timeout=timeout)
            failed = False
            return Result(model, outputs, sum(map(len, encoded.ids)))
        except FutureTimeout:
            future.cancel()
            raise DeadlineExceeded("the deadline passed before the model answered") from None
        except CancelledError:
            raise Cancelled("the request was cancelled") from None
        finally:
            model.count(failed)

    def start_generation(self, name: str, version: str, request: GenerationRequest,
                         bind: Callable[[Sequence], None] = lambda seq: None) -> tuple[LoadedModel, list[Sequence]]:
        """Check and queue a generation: its sequences, one per completion; `bind` gets each (to cancel it when
        the caller leaves)."""
        model = self._generative(name, version)
        try:
            try:
                seqs = model.backend.submit(request)
            except Unavailable:
                if version:
                    raise
                model = self._generative(name, version)  # that version retired meanwhile: the newer one takes it
                seqs = model.backend.submit(request)
        except Exception:
            model.count(failed=True)
            raise
        for seq in seqs:
            bind(seq)
        return model, seqs

    def _generative(self, name: str, version: str) -> LoadedModel:
        model = self.repository.get(name, version)
        if model.task != "generation":
            raise InvalidArgument(f"model {name} serves {model.task}, not generation", field="model")
        return model

    def generate(self, name: str, version: str, request: GenerationRequest,
                 bind: Callable[[Sequence], None] = lambda seq: None) -> tuple[LoadedModel, list[Completion], Usage]:
        """(model, completions, usage) of a whole generation: one completion per SamplingParams.n."""
        model, seqs = self.start_generation(name, version, request, bind)
        completions, usage = self.complete(model, seqs, request.deadline)
        return model, completions, usage

    @staticmethod
    def complete(model: LoadedModel, seqs: list[Sequence], deadline: float | None) -> tuple[list[Completion], Usage]:
        """Wait for a started generation: its completions and usage; counted in the statistics."""
        failed = True
        try:
            result = model.backend.complete(seqs, deadline)
            failed = False
            return result
        finally:
            model.count(failed)

    def stream(self, name: str, version: str, request: GenerationRequest,
               bind: Callable[[Sequence], None] = lambda seq: None) -> Iterator[Chunk]:
        model, seqs = self.start_generation(name, version, request, bind)
        failed = True
        try:
            yield from model.backend.stream(seqs, request.deadline)
            failed = False
        finally:
            for seq in seqs:
                seq.cancel()  # a consumer that stops early frees the slots
            model.count(failed)
