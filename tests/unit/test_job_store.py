"""The job store's delivery bookkeeping on a real Redis: a job is watched (`{prefix}:queued`) from the moment
it is recorded, or put back by the reaper, until an attempt starts it; so a send that never arrives, or
never happened, is found and sent again."""
from __future__ import annotations

import time

import pytest

from jobs.records import JobStatus
from jobs.transition import Ending, Outcome
from tests.unit.conftest import new_job

@pytest.fixture
def store(make_store):
    return make_store(lease_s=0.2)


def test_a_recorded_job_is_watched_until_an_attempt_starts_it(store):
    job_id = new_job(store, queue="q-empty")
    assert store.reap_lost(stall_s=0) == [(job_id, "background", f"{store.prefix}-q-empty")]
    started, _ = store.start(job_id, "w")
    assert started.detail == (1,)
    assert store.reap_lost(stall_s=0) == []


def test_a_job_is_not_sent_again_while_its_queue_still_holds_messages(store, redis_client):
    job_id = new_job(store, queue="q-busy")
    redis_client.rpush(f"{store.prefix}-q-busy", "a message")
    assert store.reap_lost(stall_s=0) == []
    redis_client.delete(f"{store.prefix}-q-busy")
    assert [j for j, _, _ in store.reap_lost(stall_s=0)] == [job_id]


def test_a_reaped_job_is_watched_again_so_a_failed_resend_is_retried(store):
    """The reaper put the job back to queued, then its send failed (Redis restarting): the lost-delivery
    pass must find it, or it would stay queued forever."""
    job_id = new_job(store)
    store.start(job_id, "w")
    time.sleep(0.3)  # the lease lapses: the worker died
    assert [j for j, _, _ in store.reap()] == [job_id]
    assert store.get(job_id).status == JobStatus.QUEUED
    assert [j for j, _, _ in store.reap_lost(stall_s=0)] == [job_id]


def test_a_job_cancelled_while_queued_is_no_longer_watched(store):
    job_id = new_job(store)
    assert store.end(job_id, Ending.cancelled()).applied
    assert store.reap_lost(stall_s=0) == []


def test_a_worker_starts_a_job_and_reads_its_record_and_cancel_flag_in_one_call(store):
    job_id = new_job(store)
    started, attempt, record = store.start_with_record(job_id, "w")
    assert (started.applied, started.cancel_requested, started.detail) == (True, False, (1,))
    assert (record.id, record.status, record.worker, record.attempts) == (job_id, JobStatus.IN_PROGRESS, "w", 1)
    assert record.request == store.get(job_id).request
    store.request_cancel(job_id)
    time.sleep(0.3)  # the lease lapses: the reaper puts it back, and the next start sees the cancel
    store.reap()
    started, _, record = store.start_with_record(job_id, "w2")
    assert (started.applied, started.cancel_requested, record.attempts) == (True, True, 2)
    missing = store.start_with_record("chatcmpl-missing", "w")
    assert (missing[0].outcome, missing[2]) == (Outcome.MISSING, None)
