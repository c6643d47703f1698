"""The job store core against a real Redis (the tests' own)."""

import threading
import time

import pytest

from fastserve.runtime import jobs as jobs_module
from fastserve.runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from fastserve.runtime.jobs import EventType, JobState, JobStore
from tests.support.rpc import field_of
from tests.support.waiting import wait_past, wait_until


def test_lifecycle_events_in_order(stores):
    jobs = stores.jobs
    job = jobs.create("training", "training.train", {"lr": 0.1})
    assert job.state is JobState.QUEUED and jobs.get(job.job_id).params == {"lr": 0.1}
    jobs.transition(job.job_id, JobState.RUNNING)
    jobs.report(job.job_id, EventType.PROGRESS, "half", progress=0.5)
    jobs.report(job.job_id, EventType.METRICS, data={"loss": 1.5})
    done = jobs.transition(job.job_id, JobState.SUCCEEDED, result={"uri": "artifact://models/m/1"})
    assert done.progress == 1.0 and done.result == {"uri": "artifact://models/m/1"} and done.end_time >= done.start_time
    events = list(jobs.events(job.job_id))
    assert [(e.type, e.state) for e in events] == [
        (EventType.STATE, JobState.QUEUED), (EventType.STATE, JobState.RUNNING),
        (EventType.PROGRESS, JobState.RUNNING), (EventType.METRICS, JobState.RUNNING),
        (EventType.STATE, JobState.SUCCEEDED)]
    assert events[3].data == {"loss": 1.5}
    resumed = list(jobs.events(job.job_id, after_event_id=events[2].event_id))
    assert [e.event_id for e in resumed] == [e.event_id for e in events[3:]]


def test_terminal_states_are_final(stores):
    jobs = stores.jobs
    job = jobs.create("training", "t", {})
    jobs.transition(job.job_id, JobState.RUNNING)
    jobs.transition(job.job_id, JobState.FAILED, error="boom")
    for state in (JobState.RUNNING, JobState.SUCCEEDED, JobState.CANCELLED):
        with pytest.raises(FailedPrecondition):
            jobs.transition(job.job_id, state)
    with pytest.raises(FailedPrecondition):
        jobs.request_cancel(job.job_id)
    assert jobs.get(job.job_id).error == "boom"


def test_cancel_queued_is_immediate_running_is_cooperative(stores):
    jobs = stores.jobs
    queued = jobs.create("training", "t", {})
    assert jobs.request_cancel(queued.job_id, "not needed").state is JobState.CANCELLED
    running = jobs.create("training", "t", {})
    jobs.transition(running.job_id, JobState.RUNNING)
    after = jobs.request_cancel(running.job_id)
    assert after.state is JobState.CANCELLING and after.cancel_requested and jobs.cancel_requested(running.job_id)


def test_live_watch_sees_events_as_they_come(stores):
    jobs = stores.jobs
    job = jobs.create("training", "t", {})
    seen, reads = [], []
    # `stop` is asked before each read: a second ask means the watcher has read what was there and waits live.
    watcher = threading.Thread(target=lambda: seen.extend(
        jobs.events(job.job_id, block_ms=100, stop=lambda: reads.append(1) and False)))
    watcher.start()
    wait_until(lambda: len(reads) >= 2, "the watcher to wait for live events")
    jobs.transition(job.job_id, JobState.RUNNING)
    jobs.report(job.job_id, EventType.LOG, "hello")
    jobs.transition(job.job_id, JobState.CANCELLED)
    watcher.join(5)
    assert not watcher.is_alive()
    assert [e.message for e in seen][-2:] == ["hello", "cancelled"]


def test_list_filters_and_pages(stores):
    jobs = stores.jobs
    made = [jobs.create("optimization", "optimization.quantize" if i % 2 else "optimization.prune", {"i": i})
            for i in range(5)]
    jobs.create("training", "training.train", {})
    jobs.transition(made[0].job_id, JobState.CANCELLED)
    page = jobs.list("optimization", page_size=2)
    assert [j.params["i"] for j in page.jobs] == [4, 3] and page.total_size == 5
    rest = jobs.list("optimization", page_size=2, page_token=page.next_page_token)
    last = jobs.list("optimization", page_size=2, page_token=rest.next_page_token)
    assert [j.params["i"] for j in rest.jobs + last.jobs] == [2, 1, 0] and last.next_page_token == ""
    assert {j.params["i"] for j in jobs.list("optimization", job_type="optimization.quantize").jobs} == {1, 3}
    assert [j.params["i"] for j in jobs.list("optimization", states=frozenset({JobState.CANCELLED})).jobs] == [0]


def test_bad_requests(stores):
    with pytest.raises(NotFound):
        stores.jobs.get("missing")
    with pytest.raises(InvalidArgument) as info:
        stores.jobs.list("training", page_token="garbage!")
    assert field_of(info.value) == "page.page_token"
    with pytest.raises(InvalidArgument) as info:
        stores.jobs.list("training", page_size=-1)
    assert field_of(info.value) == "page.page_size"
    with pytest.raises(InvalidArgument) as info:
        stores.jobs.list("training", job_type="a:state:RUNNING")
    assert field_of(info.value) == "filter.job_type"
    job = stores.jobs.create("training", "t", {})
    with pytest.raises(InvalidArgument):
        list(stores.jobs.events(job.job_id, after_event_id="nope"))


def test_page_size_above_the_maximum_is_clamped(stores):
    jobs = stores.jobs
    for _ in range(3):
        jobs.create("preprocessing", "t", {})
    assert len(jobs.list("preprocessing", page_size=5000).jobs) == 3


def test_an_id_that_is_not_a_job_id_is_not_found_without_reaching_redis(stores):
    jobs = stores.jobs
    job = jobs.create("training", "t", {})
    # Each names a real key of the stack (the job's event stream, an index), or another stack's job.
    for bad in (f"{job.job_id}:events", job.job_id.upper(), "../" + job.job_id, job.job_id + "0", "",
                f"x:job:{job.job_id}"):
        for call in (jobs.get, jobs.cancel_requested, jobs.request_cancel, lambda i: list(jobs.events(i))):
            with pytest.raises(NotFound):
                call(bad)
    jobs.redis.hset(f"{jobs.prefix}job:not-an-id", mapping={"job_id": "not-an-id", "service": "training"})
    with pytest.raises(NotFound):
        jobs.get("not-an-id")


def test_pages_walk_several_state_sets_newest_first(stores):
    jobs = stores.jobs
    made = [jobs.create("optimization", "optimization.prune", {"i": i}) for i in range(7)]
    for job in made[::2]:
        jobs.transition(job.job_id, JobState.CANCELLED)
    jobs.transition(made[1].job_id, JobState.RUNNING)
    states = frozenset({JobState.CANCELLED, JobState.QUEUED})
    seen, token = [], ""
    while True:
        page = jobs.list("optimization", states=states, page_size=2, page_token=token)
        assert page.total_size == 6 and len(page.jobs) <= 2
        seen += [j.params["i"] for j in page.jobs]
        if not (token := page.next_page_token):
            break
    assert seen == [6, 5, 4, 3, 2, 0]
    assert [j.job_id for j in jobs.active("optimization")] == [made[1].job_id]
    jobs.request_cancel(made[1].job_id)
    assert [j.state for j in jobs.active("optimization")] == [JobState.CANCELLING]
    jobs.transition(made[1].job_id, JobState.CANCELLED)
    assert jobs.active("optimization") == []
    assert jobs.list("optimization", states=frozenset({JobState.RUNNING})).total_size == 0


def test_event_stream_is_trimmed_and_a_resumed_watch_gets_what_remains(stores, monkeypatch):
    monkeypatch.setattr(jobs_module, "MAX_EVENTS", 100)
    jobs = stores.jobs
    job = jobs.create("training", "t", {})
    first = next(jobs.events(job.job_id)).event_id
    jobs.transition(job.job_id, JobState.RUNNING)
    for i in range(1000):
        jobs.report(job.job_id, EventType.LOG, f"line {i}")
    jobs.transition(job.job_id, JobState.SUCCEEDED)
    # Approximate trimming drops whole stream nodes (100 entries each): a bound, not an exact count.
    assert jobs.redis.xlen(jobs.job_key(job.job_id, "events")) <= 300
    resumed = list(jobs.events(job.job_id, after_event_id=first))
    assert 100 <= len(resumed) <= 300 and resumed[-1].state is JobState.SUCCEEDED
    assert resumed[-2].message == "line 999"


def test_finished_jobs_expire_after_the_retention(stores):
    jobs = JobStore(stores.jobs.redis, stores.jobs.prefix, retention_seconds=1)
    done, running = jobs.create("training", "t", {}), jobs.create("training", "t", {})
    jobs.transition(running.job_id, JobState.RUNNING)
    jobs.transition(done.job_id, JobState.CANCELLED)
    assert 0 < jobs.redis.ttl(jobs.job_key(done.job_id)) <= 1
    assert 0 < jobs.redis.ttl(jobs.job_key(done.job_id, "events")) <= 1
    assert jobs.redis.ttl(jobs.job_key(running.job_id)) == -1
    wait_until(lambda: not jobs.redis.exists(jobs.job_key(done.job_id)), "the finished job to expire", timeout=5)
    with pytest.raises(NotFound):
        jobs.get(done.job_id)
    assert [j.job_id for j in jobs.list("training").jobs] == [running.job_id]
    assert jobs.list("training", job_type="t", states=frozenset({JobState.CANCELLED})).total_size == 0
    assert not any(jobs.redis.zscore(k, done.job_id) for k in jobs.redis.scan_iter(f"{jobs.prefix}jobs:*")
                   if jobs.redis.type(k) == "zset")


def test_watch_of_a_finished_job_ends_after_its_last_event(stores):
    jobs = stores.jobs
    job = jobs.create("training", "t", {})
    jobs.transition(job.job_id, JobState.CANCELLED)
    last = list(jobs.events(job.job_id))[-1].event_id
    seen: list = []
    watcher = threading.Thread(target=lambda: seen.extend(jobs.events(job.job_id, after_event_id=last)),
                               daemon=True)
    started = time.monotonic()
    watcher.start()
    watcher.join(5)
    assert not watcher.is_alive() and seen == [] and time.monotonic() - started < 2


def test_lease_is_exclusive_and_expires(stores):
    from fastserve.runtime.job_lease import JobLease

    job = stores.jobs.create("training", "t", {})
    # TTLs of seconds, not fractions: a heartbeat every third of one is on time even on a busy machine.
    first = JobLease(stores.jobs, job.job_id, ttl_seconds=1.5)
    taken = time.monotonic()
    assert first.acquire()
    wait_past(taken + 1.6)  # the condition is the clock: the TTL has run out since it was taken
    assert first.held() and not JobLease(stores.jobs, job.job_id, 1.5).acquire()  # renewed by its heartbeat
    first.release()
    second = JobLease(stores.jobs, job.job_id, 1.5)
    assert second.acquire()  # released: free at once
    second.release()
    # A runner that died leaves its lease as this key, which nothing renews.
    stores.jobs.redis.set(stores.jobs.job_key(job.job_id, "lease"), "a dead runner's token", px=1500)
    assert not JobLease(stores.jobs, job.job_id, 1.5).acquire()  # its last renewal still holds
    wait_until(lambda: JobLease(stores.jobs, job.job_id, 1.5).acquire(), "the dead runner's lease to expire")


def test_runner_skips_a_job_whose_lease_is_held(stores):
    from fastserve.runtime import job_runner
    from fastserve.runtime.job_lease import JobLease

    job = stores.jobs.create("training", "test.never", {})
    held = JobLease(stores.jobs, job.job_id, 5)
    assert held.acquire()
    try:
        assert job_runner.run(stores, job.job_id) is JobState.QUEUED  # nothing ran, not even FAILED
    finally:
        held.release()


def test_orphans_are_requeued_once(stores):
    from fastserve.runtime.job_lease import JobLease, recover_orphans

    orphan = stores.jobs.create("training", "t", {})
    stores.jobs.transition(orphan.job_id, JobState.RUNNING)
    alive = stores.jobs.create("training", "t", {})
    stores.jobs.transition(alive.job_id, JobState.RUNNING)
    lease = JobLease(stores.jobs, alive.job_id, 5)
    lease.acquire()
    queued = []
    try:
        for _ in range(2):  # two workers sweeping at once
            recover_orphans(stores.jobs, ("training",), lambda s, j: queued.append((s, j)), claim_seconds=5)
    finally:
        lease.release()
    assert queued == [("training", orphan.job_id)]
    assert stores.jobs.get(orphan.job_id).message == "its worker was lost; queued again to resume"
