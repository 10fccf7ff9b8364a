"""A job's Celery task meeting a job it must not run, on a real Redis (the worker runtime a stand-in: store,
settings, name and delivery notes; no engine is reached). A delivery that sees the cancel flag or the deadline
goes through the job store's transitions like everyone else: it ends a job that no attempt runs (its start
takes the lease, the attempt ends it at once), and leaves alone a job that another worker is running (that
worker's attempt sees the cancel or the deadline)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from config.settings import Settings
from jobs.records import JobStatus
from tests.conftest import REDIS_URL
from tests.unit.conftest import new_job
from workers.tasks import _execute_job

@pytest.fixture
def store(make_store):
    return make_store(lease_s=30)


def runtime(store, **settings) -> SimpleNamespace:
    return SimpleNamespace(store=store, name="duplicate-worker", deliveries=SimpleNamespace(started=lambda job_id: None),
                           settings=Settings(redis_url=REDIS_URL, redis_prefix=store.prefix, **settings))


@pytest.mark.parametrize("why", ["cancel", "deadline"])
def test_a_duplicate_delivery_leaves_a_job_running_elsewhere_alone(store, why):
    """Issue 13, case 3: it used to end the job (cancelled, or failed past its deadline) under the feet of
    the worker running it."""
    job_id = new_job(store, age_s=100 if why == "deadline" else 0)
    store.start(job_id, "the-worker-running-it")
    if why == "cancel":
        store.request_cancel(job_id)
    assert _execute_job(runtime(store, job_deadline_s=50), job_id) == "skipped"
    assert store.get(job_id).status == JobStatus.IN_PROGRESS
    assert store.read_log(job_id) == []


@pytest.mark.parametrize("why", ["cancel", "deadline"])
def test_a_delivery_that_sees_the_cancel_or_deadline_ends_a_job_nobody_runs(store, why):
    job_id = new_job(store, age_s=100 if why == "deadline" else 0)
    if why == "cancel":
        store.request_cancel(job_id)
    expected = ("cancelled", JobStatus.CANCELLED) if why == "cancel" else ("error", JobStatus.FAILED)
    news = []  # what the start and the end told of the pool's parked jobs: none, so no pump is woken
    assert _execute_job(runtime(store, job_deadline_s=50), job_id, news.append) == expected[0]
    assert news == [False, False]
    assert store.get(job_id).status == expected[1]
    assert [e.type for e in store.read_log(job_id)] == [expected[0]]
