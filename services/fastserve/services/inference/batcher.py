"""Dynamic batching: requests queue per model and a worker runs them in batches.

Each request is one future. A worker takes the highest-priority, oldest request, waits for more
while the batch is not full and requests keep arriving (at most `max_queue_delay`), fills it with the
queued requests whose token length is closest (less padding), drops work whose caller gave up
(cancelled or past its deadline) before computing, and checks that a batch returns one result per
input. A batch that fails runs its requests again one by one, so a bad one fails its caller alone. A
full queue refuses at once, so overload shows as RESOURCE_EXHAUSTED, not unbounded latency.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from fastserve.runtime.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)

ARRIVAL_GAP = 0.002  # seconds without a new request after which a partial batch stops waiting
# Upper bounds of a model's batching settings (documented on the proto's BatchingConfig and ModelConfig):
# every worker is a thread and every queued request holds its tokens, so each must be bounded.
MAX_INSTANCES = 8  # more workers than that only contend for the one compute thread
MAX_BATCH_SIZE = 1024
MAX_QUEUE_SIZE = 65536
MAX_QUEUE_DELAY_US = 1_000_000


@dataclass(frozen=True)
class BatchingSettings:
    enabled: bool = True
    max_batch_size: int = 32  # inputs (texts) per batch
    max_queue_delay_us: int = 10000  # the longest a request waits for its batch to fill
    max_queue_size: int = 1024  # queued requests
    instances: int = 1  # worker threads running batches

    def check(self) -> None:
        """Refuse settings out of their documented bounds, naming the ModelConfig field."""
        for name, value, least, most in (("instances", self.instances, 1, MAX_INSTANCES),
                                         ("batching.max_batch_size", self.max_batch_size, 1, MAX_BATCH_SIZE),
                                         ("batching.max_queue_size", self.max_queue_size, 0, MAX_QUEUE_SIZE),
                                         ("batching.max_queue_delay_us", self.max_queue_delay_us, 0,
                                          MAX_QUEUE_DELAY_US)):
            if not least <= value <= most:
                raise InvalidArgument(f"{name} must be in [{least}, {most}], got {value}", field=f"config.{name}")


@dataclass
class Work:
    payload: Any
    size: int  # inputs in this request
    length: int  # longest input, in tokens
    priority: int
    deadline: float | None  # time.monotonic() after which the caller no longer waits
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)
    order: int = 0


BatchRunner = Callable[[list[Any]], Sequence[Any]]
Observer = Callable[[list["Work"], float], None]  # (batch, compute seconds)


class DynamicBatcher:
    def __init__(self, name: str, run: BatchRunner, settings: BatchingSettings,
                 observe: Observer = lambda batch, seconds: None,
                 compute: Callable[..., Any] = lambda fn, *args: fn(*args)) -> None:
        self.name, self.run, self.settings, self.observe = name, run, settings, observe
        # Where a taken batch is checked and run (the process's compute thread, compute.py): there it may
        # wait behind other models' work, so its callers' deadlines and cancels are checked when it gets
        # its turn, not when it was taken.
        self.compute = compute
        self.max_batch = settings.max_batch_size if settings.enabled else 1
        self.delay = settings.max_queue_delay_us / 1e6 if settings.enabled else 0.0
        self.gap = min(self.delay, ARRIVAL_GAP)
        self.queue: list[Work] = []
        self.cond = threading.Condition()
        self.counter = itertools.count()
        self.accepting = True
        self.workers = [threading.Thread(target=self._loop, daemon=True, name=f"batcher-{name}-{i}")
                        for i in range(max(settings.instances, 1))]
        for worker in self.workers:
            worker.start()

    def submit(self, payload: Any, size: int, length: int, priority: int = 0,
               deadline: float | None = None) -> Future:
        work = Work(payload, size, length, priority, deadline)
        with self.cond:
            if not self.accepting:
                raise Unavailable(f"model {self.name} is unloading")
            if len(self.queue) >= self.settings.max_queue_size:
                raise ResourceExhausted(f"the queue of {self.name} is full ({self.settings.max_queue_size} requests)")
            work.order = next(self.counter)
            self.queue.append(work)
            self.cond.notify()
        return work.future

    def _take(self) -> list[Work] | None:
        """The next batch, or None when stopping with nothing left."""
        with self.cond:
            while not self.queue:
                if not self.accepting:
                    return None
                self.cond.wait()
            first = min(self.queue, key=lambda w: (-w.priority, w.order))
            ready_at = first.enqueued + self.delay
            # Wait for a fuller batch while requests keep arriving, but not past the delay: a burst of
            # clients answered together comes back together, and a lone request goes after one gap.
            while sum(w.size for w in self.queue) < self.max_batch and self.accepting:
                now = time.monotonic()
                last_arrival = max(w.enqueued for w in self.queue)
                remaining = min(ready_at, last_arrival + self.gap) - now
                if remaining <= 0:
                    break
                self.cond.wait(remaining)
            first = min(self.queue, key=lambda w: (-w.priority, w.order))
            # Same priority first, then nearest in length: batches of similar lengths pad less.
            candidates = sorted(self.queue, key=lambda w: (w is not first, -w.priority, abs(w.length - first.length),
                                                           w.order))
            batch, size = [], 0
            for work in candidates:
                if batch and size + work.size > self.max_batch:
                    continue
                batch.append(work)
                size += work.size
                if size >= self.max_batch:
                    break
            taken = {id(w) for w in batch}
            self.queue = [w for w in self.queue if id(w) not in taken]
            return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            try:
                self.compute(self._execute, batch)
            except Exception:  # noqa: BLE001 - the worker must outlive any one batch
                log.exception("batch bookkeeping failed in %s", self.name)

    def _execute(self, batch: list[Work]) -> None:
        now = time.monotonic()
        live = []
        for work in batch:
            if not work.future.set_running_or_notify_cancel():
                continue  # the caller cancelled
            if work.deadline is not None and now > work.deadline:
                work.future.set_exception(DeadlineExceeded("the deadline passed while the request was queued"))
            else:
                live.append(work)
        if not live:
            return
        start = time.perf_counter()
        try:
            results = self._run(live)
        except Exception as exc:  # noqa: BLE001 - the callers get the error; the worker lives on
            if len(live) == 1:
                log.exception("a request failed in %s", self.name)
                live[0].future.set_exception(exc)
                return
            # One bad request must not fail the others it was batched with: each runs again on its own.
            log.warning("batch of %d failed in %s (%s): running its requests one by one", len(live), self.name,
                        exc)
            done = []
            for work in live:
                try:
                    (result,) = self._run([work])
                except Exception as alone:  # noqa: BLE001 - this caller's error alone
                    log.exception("a request failed in %s", self.name)
                    work.future.set_exception(alone)
                else:
                    work.future.set_result(result)
                    done.append(work)
            if done:
                self.observe(done, time.perf_counter() - start)
            return
        seconds = time.perf_counter() - start
        for work, result in zip(live, results, strict=True):
            work.future.set_result(result)
        self.observe(live, seconds)

    def _run(self, batch: list[Work]) -> Sequence[Any]:
        results = self.run([w.payload for w in batch])
        if len(results) != len(batch):
            raise RuntimeError(f"batch of {len(batch)} returned {len(results)} results")
        return results

    def drain(self, timeout: float = 60.0) -> None:
        """Stop accepting, finish what is queued or running, then stop the workers."""
        with self.cond:
            self.accepting = False
            self.cond.notify_all()
        for worker in self.workers:
            worker.join(timeout)
