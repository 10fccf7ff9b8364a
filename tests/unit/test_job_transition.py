"""The one transition of a job's state (jobs/transition.py), on a real Redis: who may change what, events
numbered by the store, and what each caller is told."""
from __future__ import annotations

import time

import pytest

from jobs.records import JobError, JobEvent, JobResult, JobStatus, Usage
from jobs.telemetry import JOB_STATES
from jobs.transition import Ending, Outcome, Write
from tests.unit.conftest import new_job

DONE = Ending.completed(JobResult(text="ab", finish_reason="stop",
                                  usage=Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5)))


@pytest.fixture
def store(make_store):
    return make_store(lease_s=0.2)


def delta(text: str) -> JobEvent:
    return JobEvent(type="delta", text=text, token_ids=[7])


def log(store, job_id) -> list[tuple[int, str, str]]:
    return [(e.seq, e.type, e.text) for e in store.read_log(job_id)]


def requeued_after_a_lost_worker(store) -> str:
    """A job whose first attempt published a delta, then lost its worker: the reaper put it back."""
    job_id = new_job(store)
    _, attempt = store.start(job_id, "w1")
    assert store.write(attempt, [delta("a")]).applied
    time.sleep(0.3)  # the lease lapses
    assert [j for j, _, _ in store.reap()] == [job_id]
    return job_id


def test_cancelling_a_requeued_job_with_events_ends_it_after_them(store):
    """Issue 13, case 1: the API used to end such a job with event seq 0, which its log was already past."""
    job_id = requeued_after_a_lost_worker(store)
    assert store.get(job_id).status == JobStatus.QUEUED
    done = store.end(job_id, Ending.cancelled())
    assert done.outcome is Outcome.APPLIED
    assert store.get(job_id).status == JobStatus.CANCELLED
    assert log(store, job_id) == [(0, "delta", "a"), (1, "cancelled", "")]
    assert store.start(job_id, "w2")[0].outcome is Outcome.TERMINAL  # its queued message is skipped
    assert store.reap_lost(stall_s=0) == []


def test_a_caller_without_an_attempt_cannot_end_a_running_job(store):
    """Issue 13, case 3: a duplicate delivery that sees the deadline (or the API) must not end a job that
    another worker is running: it is told `running`, and the job goes on."""
    job_id = new_job(store)
    _, attempt = store.start(job_id, "w1")
    error = JobError(message="late", code="deadline_exceeded")
    assert store.end(job_id, Ending.failed(error)).outcome is Outcome.RUNNING
    assert store.get(job_id).status == JobStatus.IN_PROGRESS
    assert store.write(attempt, [delta("a")], DONE).applied
    assert store.get(job_id).status == JobStatus.COMPLETED
    assert log(store, job_id) == [(0, "delta", "a"), (1, "done", "")]


def test_a_new_attempt_numbers_its_events_after_the_old_ones(store):
    job_id = requeued_after_a_lost_worker(store)
    started, new = store.start(job_id, "w2")
    assert started.detail == (2,)
    assert store.write(new, [delta("b")]).applied
    assert store.write(new, [], DONE, acknowledged=1).applied
    assert log(store, job_id) == [(0, "delta", "a"), (1, "delta", "b"), (2, "done", "")]


def test_an_attempt_that_lost_its_lease_is_fenced(store):
    job_id = new_job(store)
    _, old = store.start(job_id, "w1")
    time.sleep(0.3)
    store.reap()
    _, new = store.start(job_id, "w2")
    assert store.write(old, [delta("x")]).outcome is Outcome.FENCED
    assert store.write(old, [], DONE).outcome is Outcome.FENCED
    assert store.write(new, [delta("y")]).applied
    assert log(store, job_id) == [(0, "delta", "y")]


def test_a_retried_write_logs_nothing_twice(store):
    """Redis applied a write but its answer was lost: the retry carries the same events (and more made
    meanwhile), with the same count of acknowledged ones."""
    job_id = new_job(store)
    _, attempt = store.start(job_id, "w1")
    assert store.write(attempt, [delta("a")]).applied
    assert store.write(attempt, [delta("b")], acknowledged=1).applied        # answer lost
    assert store.write(attempt, [delta("b"), delta("c")], acknowledged=1).applied  # the retry
    assert log(store, job_id) == [(0, "delta", "a"), (1, "delta", "b"), (2, "delta", "c")]


def test_the_reaper_leaves_a_renewed_lease_alone(store):
    job_id = new_job(store)
    _, attempt = store.start(job_id, "w1")
    store.redis.zadd(store.keys.leases(), {job_id: 0})  # its index entry fell due, the lease itself is alive
    assert store.reap() == []
    assert store.get(job_id).status == JobStatus.IN_PROGRESS
    assert store.write(attempt, [], DONE).applied


def test_answers_for_missing_and_finished_jobs(store):
    assert store.end("chatcmpl-gone", Ending.cancelled()).outcome is Outcome.MISSING
    job_id = new_job(store)
    assert store.end(job_id, Ending.cancelled()).applied
    assert store.end(job_id, Ending.cancelled()).outcome is Outcome.TERMINAL
    assert log(store, job_id) == [(0, "cancelled", "")]


def test_the_cancel_flag_comes_with_every_answer(store):
    job_id = new_job(store)
    _, attempt = store.start(job_id, "w1")
    assert not store.write(attempt, [delta("a")]).cancel_requested
    store.request_cancel(job_id)
    assert store.write(attempt, [], acknowledged=1).cancel_requested


def test_a_cancel_ends_a_waiting_job_and_asks_a_running_one_to_stop(store):
    waiting, running = new_job(store), new_job(store)
    _, attempt = store.start(running, "w1")
    assert store.cancel(waiting).applied and store.get(waiting).status == JobStatus.CANCELLED
    assert store.cancel(running).outcome is Outcome.RUNNING
    assert store.get(running).status == JobStatus.IN_PROGRESS
    assert store.write(attempt, [delta("a")]).cancel_requested  # what its attempt hears on its next write


# --- the hot path: a publisher cycle's events (APPEND through write_many)
def test_a_cycle_writes_many_runs_in_one_round_trip_each_fenced_or_applied_alone(store):
    jobs = [new_job(store) for _ in range(3)]
    attempts = [store.start(job_id, "w1")[1] for job_id in jobs]
    time.sleep(0.3)
    store.reap()  # every lease lapsed: the second job goes to a new attempt, the others are started again
    stale = attempts[1]
    attempts = [store.start(job_id, "w2")[1] for job_id in jobs]
    answers = store.write_many([Write(attempts[0], [delta("a"), delta("b")]), Write(stale, [delta("x")]),
                                Write(attempts[2], [delta("c")])])
    assert [a.outcome for a in answers] == [Outcome.APPLIED, Outcome.FENCED, Outcome.APPLIED]
    assert log(store, jobs[0]) == [(0, "delta", "a"), (1, "delta", "b")]
    assert log(store, jobs[1]) == []
    assert log(store, jobs[2]) == [(0, "delta", "c")]


def test_a_cycle_retried_after_a_lost_answer_logs_nothing_twice(store):
    job_id = new_job(store)
    _, attempt = store.start(job_id, "w1")
    store.write_many([Write(attempt, [delta("a")])])
    store.write_many([Write(attempt, [delta("b")], acknowledged=1)])                # answer lost
    store.write_many([Write(attempt, [delta("b"), delta("c")], acknowledged=1)])  # the retry
    store.write(attempt, [delta("d")], DONE, acknowledged=3)
    assert log(store, job_id) == [(0, "delta", "a"), (1, "delta", "b"), (2, "delta", "c"), (3, "delta", "d"),
                                  (4, "done", "")]


def test_a_resumed_attempt_knows_where_its_events_start(store):
    job_id = requeued_after_a_lost_worker(store)
    _, new = store.start(job_id, "w2")
    assert new.first_seq == 1
    assert store.write_many([Write(new, [delta("b")])])[0].applied
    assert log(store, job_id) == [(0, "delta", "a"), (1, "delta", "b")]


def test_a_log_that_lost_acknowledged_events_is_a_gap_not_a_renumbering(store):
    """Redis lost events it had acknowledged (a crash between AOF syncs): the next write must not give its
    events the lost ones' seqs (a client may have seen those live), for an end as for events."""
    job_id = new_job(store)
    _, attempt = store.start(job_id, "w1")
    store.write(attempt, [delta("a"), delta("b")])
    store.redis.xdel(store.keys.event_log(job_id), "0-2")  # the lost entry
    assert store.write(attempt, [delta("c")], acknowledged=2).outcome is Outcome.GAP
    assert store.write(attempt, [], DONE, acknowledged=2).outcome is Outcome.GAP
    assert log(store, job_id) == [(0, "delta", "a")]
    assert store.get(job_id).status == JobStatus.IN_PROGRESS


def test_events_ask_for_the_cancel_flag_only_when_the_writer_polls_it(store):
    job_id = new_job(store)
    _, attempt = store.start(job_id, "w1")
    store.request_cancel(job_id)
    assert not store.write_many([Write(attempt, [delta("a")], check_cancel=False)])[0].cancel_requested
    assert store.write_many([Write(attempt, [delta("b")], acknowledged=1)])[0].cancel_requested


def test_the_log_expiry_is_set_by_an_attempts_first_events_and_its_end_not_by_every_event(store):
    job_id = new_job(store)
    key = store.keys.event_log(job_id)
    _, attempt = store.start(job_id, "w1")
    store.write(attempt, [delta("a")])
    assert 0 < store.redis.ttl(key) <= store.ttl_s
    store.redis.persist(key)
    store.write(attempt, [delta("b")], acknowledged=1)
    assert store.redis.ttl(key) == -1  # not refreshed per event
    store.write(attempt, [], DONE, acknowledged=2)
    assert 0 < store.redis.ttl(key) <= store.ttl_s


def test_each_change_of_state_moves_the_jobs_metrics_entry_in_the_same_step(store):
    def states(job_id):
        return [s for s in JOB_STATES if store.redis.zscore(store.telemetry.state_key(s), job_id) is not None]

    _, before = store.telemetry.job_counts()
    job_id = new_job(store)
    assert states(job_id) == ["queued"]
    _, attempt = store.start(job_id, "w1")
    store.start(job_id, "w1")  # fenced: changes nothing
    assert states(job_id) == ["in_progress"]
    time.sleep(0.3)
    store.reap()
    assert states(job_id) == ["queued"]
    _, attempt = store.start(job_id, "w2")
    store.write(attempt, [], DONE)
    assert states(job_id) == ["completed"]
    _, after = store.telemetry.job_counts()
    assert {s: after[s] - before[s] for s in JOB_STATES} == {  # entered queued twice (sent again)
        "queued": 2, "in_progress": 2, "completed": 1, "failed": 0, "cancelled": 0}
    cancelled = new_job(store)
    store.cancel(cancelled)
    assert states(cancelled) == ["cancelled"]


def test_a_jobs_first_text_stamps_its_first_token_time_once(store):
    streamed, short = new_job(store), new_job(store)
    _, attempt = store.start(streamed, "w1")
    store.write(attempt, [delta("a")])
    first = store.redis.hget(store.keys.job(streamed), "first_token_at")
    assert first is not None
    time.sleep(0.01)
    store.write(attempt, [delta("b")], DONE, acknowledged=1)
    assert store.redis.hget(store.keys.job(streamed), "first_token_at") == first
    _, attempt = store.start(short, "w1")  # all its text came with its end, in one write
    store.write(attempt, [delta("a")], DONE)
    assert store.redis.hget(store.keys.job(short), "first_token_at") is not None
    cancelled = new_job(store)
    store.cancel(cancelled)
    assert store.redis.hget(store.keys.job(cancelled), "first_token_at") is None
