"""The job store's delivery bookkeeping on a real Redis: a job is watched (`{prefix}:queued`) from the moment
it is recorded, or put back by the reaper, until an attempt starts it; so a send that never arrives, or
never happened, is found and sent again."""
from __future__ import annotations

import time

import pytest

from jobs.records import JobStatus
from jobs.store import JobNotFound
from jobs.transition import Ending
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


def test_a_worker_reads_the_record_and_the_cancel_flag_together(store):
    job_id = new_job(store)
    record, cancelled = store.get_with_cancel_flag(job_id)
    assert (record.id, record.status, cancelled) == (job_id, JobStatus.QUEUED, False)
    store.request_cancel(job_id)
    assert store.get_with_cancel_flag(job_id)[1] is True
    with pytest.raises(JobNotFound):
        store.get_with_cancel_flag("chatcmpl-missing")


def test_a_job_delivered_to_a_dead_worker_is_sent_again_however_busy_its_queue(store, redis_client):
    """Issue 13, case 4: the worker that received the message died before starting the job (its message sits
    in that worker's unacked set for the visibility timeout, an hour). Under steady load the queue is never
    empty, so waiting for an empty queue meant waiting out the job's deadline."""
    job_id = new_job(store, queue="q-busy")
    redis_client.rpush(f"{store.prefix}-q-busy", "other jobs' messages")
    store.heartbeat("live-worker", {}, ttl_s=60)
    store.mark_delivered(job_id, "live-worker")
    assert store.reap_lost(stall_s=0) == []  # its receiver is alive: it will start it
    store.mark_delivered(job_id, "dead-worker")  # no heartbeat: gone
    assert store.reap_lost(stall_s=0) == [(job_id, "background", f"{store.prefix}-q-busy")]
    assert store.reap_lost(stall_s=0) == []  # sent once: delivered to no one now, and its queue is busy
    store.start(job_id, "w")
    assert "delivered_to" not in redis_client.hgetall(store.keys.job(job_id))
