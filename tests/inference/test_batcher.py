"""The dynamic batcher alone: batching, limits, deadlines, cancellation, priorities, bucketing."""

from __future__ import annotations

import threading
import time

import pytest

from fastserve.runtime.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from fastserve.services.inference.batcher import BatchingSettings, DynamicBatcher
from tests.support.waiting import wait_past


class Recorder:
    """A batch runner that records its batches; `gate` holds the first batch until released, and `taken` says
    the worker has one in hand."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[list] = []
        self.delay = delay
        self.gate = threading.Event()
        self.gate.set()
        self.taken = threading.Event()

    def __call__(self, payloads):
        self.taken.set()
        self.gate.wait(5)
        self.batches.append(list(payloads))
        time.sleep(self.delay)
        return [f"done:{p}" for p in payloads]


def batcher(run, **settings) -> DynamicBatcher:
    return DynamicBatcher("test", run, BatchingSettings(**{"max_queue_delay_us": 20000, **settings}))


def test_concurrent_requests_form_batches_and_each_gets_its_result():
    run = Recorder(delay=0.02)
    b = batcher(run, max_batch_size=8)
    futures = [b.submit(i, 1, 5) for i in range(20)]
    assert [f.result(5) for f in futures] == [f"done:{i}" for i in range(20)]
    assert max(len(batch) for batch in run.batches) == 8 and len(run.batches) <= 4
    b.drain()


def test_batching_off_runs_one_request_at_a_time():
    run = Recorder()
    b = batcher(run, enabled=False)
    futures = [b.submit(i, 1, 5) for i in range(5)]
    [f.result(5) for f in futures]
    assert all(len(batch) == 1 for batch in run.batches)
    b.drain()


def test_full_queue_refuses_at_once():
    run = Recorder()
    run.gate.clear()
    b = batcher(run, max_batch_size=1, max_queue_size=3, max_queue_delay_us=0)
    first = b.submit("running", 1, 1)
    assert run.taken.wait(5), "the worker never took the first request"
    queued = [b.submit(i, 1, 1) for i in range(3)]
    start = time.monotonic()
    with pytest.raises(ResourceExhausted):
        b.submit("one too many", 1, 1)
    assert time.monotonic() - start < 0.05
    run.gate.set()
    assert first.result(5) == "done:running" and [q.result(5) for q in queued] == ["done:0", "done:1", "done:2"]
    b.drain()


def test_expired_and_cancelled_work_is_dropped_before_compute():
    run = Recorder()
    run.gate.clear()
    b = batcher(run, max_batch_size=1, max_queue_delay_us=0)
    blocker = b.submit("blocker", 1, 1)
    assert run.taken.wait(5), "the worker never took the first request"
    deadline = time.monotonic() + 0.01
    late = b.submit("late", 1, 1, deadline=deadline)
    gone = b.submit("gone", 1, 1)
    assert gone.cancel()
    kept = b.submit("kept", 1, 1)
    wait_past(deadline)  # `late` expires in the queue, behind the blocker
    run.gate.set()
    with pytest.raises(DeadlineExceeded):
        late.result(5)
    assert kept.result(5) == "done:kept" and blocker.result(5) == "done:blocker"
    assert [p for batch in run.batches for p in batch] == ["blocker", "kept"]
    b.drain()


def test_priority_and_length_bucketing():
    run = Recorder()
    run.gate.clear()
    b = batcher(run, max_batch_size=2, max_queue_delay_us=0)
    b.submit("blocker", 1, 1)
    assert run.taken.wait(5), "the worker never took the first request"
    futures = [b.submit(name, 1, length, priority) for name, length, priority in
               [("short-a", 5, 0), ("long-a", 200, 0), ("short-b", 6, 0), ("urgent", 190, 9), ("long-b", 210, 0)]]
    run.gate.set()
    [f.result(5) for f in futures]
    assert run.batches[1:] == [["urgent", "long-a"], ["short-a", "short-b"], ["long-b"]]
    b.drain()


def test_a_failing_batch_fails_its_callers_only():
    calls = []

    def run(payloads):
        calls.append(payloads)
        if len(calls) == 1:
            return []  # wrong number of results
        return payloads

    b = batcher(run, max_batch_size=4, max_queue_delay_us=0)
    with pytest.raises(RuntimeError, match="returned 0 results"):
        b.submit("x", 1, 1).result(5)
    assert b.submit("y", 1, 1).result(5) == "y"
    b.drain()


def test_drain_finishes_queued_work_then_refuses():
    run = Recorder(delay=0.05)
    b = batcher(run, max_batch_size=1, max_queue_delay_us=0)
    futures = [b.submit(i, 1, 1) for i in range(3)]
    b.drain()
    assert [f.result(0) for f in futures] == ["done:0", "done:1", "done:2"]
    with pytest.raises(Unavailable):
        b.submit("after", 1, 1)


def test_work_both_cancelled_and_expired_does_not_stop_the_worker():
    run = Recorder()
    run.gate.clear()
    b = batcher(run, max_batch_size=1, max_queue_delay_us=0)
    b.submit("blocker", 1, 1)
    assert run.taken.wait(5), "the worker never took the first request"
    deadline = time.monotonic() + 0.001
    doomed = b.submit("doomed", 1, 1, deadline=deadline)
    doomed.cancel()
    wait_past(deadline)
    run.gate.set()
    assert b.submit("after", 1, 1).result(5) == "done:after"
    b.drain()


def test_a_bad_request_in_a_batch_fails_alone():
    """The batch fails as a whole (one payload is poison); each request then runs on its own, so only the
    bad one's caller gets the error, the others their results, and the statistics count the good ones."""
    observed = []

    def run(payloads):
        if "bad" in payloads:
            raise ValueError("cannot run bad")
        return [f"done:{p}" for p in payloads]

    gate, holding = threading.Event(), threading.Event()

    def gated(payloads):
        holding.set()
        assert gate.wait(5), "the test never opened the gate"
        return run(payloads)

    b = DynamicBatcher("test", gated, BatchingSettings(max_batch_size=8, max_queue_delay_us=20000),
                       observe=lambda batch, seconds: observed.append([w.payload for w in batch]))
    blocker = b.submit("blocker", 1, 1)
    assert holding.wait(5), "the worker never took the blocker"  # it does: the next three queue together
    futures = {name: b.submit(name, 1, 1) for name in ("a", "bad", "b")}
    gate.set()
    assert blocker.result(5) == "done:blocker"
    assert futures["a"].result(5) == "done:a" and futures["b"].result(5) == "done:b"
    with pytest.raises(ValueError, match="cannot run bad"):
        futures["bad"].result(5)
    assert observed[-1] == ["a", "b"]
    b.drain()
