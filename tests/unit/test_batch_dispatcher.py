"""The API's batch driver on a real Redis (its queue a stand-in: no worker runs here; the test plays the
workers through the job store's transitions). Two drivers at once, and a batch cancelled while some of its
lines were put back on the queue by a lost worker."""
from __future__ import annotations

import io
import json
import time
import uuid

import pytest

from app.batches import BatchDispatcher, BatchService
from config.settings import Settings
from jobs.batches import BatchStore
from jobs.files import FileStore
from jobs.models import ModelDirectory, model_entry
from jobs.records import JobEvent, JobResult, JobStatus, Usage
from jobs.store import JobStore
from jobs.transition import Ending
from tests.conftest import REDIS_URL

LINES = 4


@pytest.fixture
def settings(redis_client):
    settings = Settings(redis_url=REDIS_URL, redis_prefix=f"unit-{uuid.uuid4().hex[:8]}", api_keys=[],
                        job_lease_s=0.2)
    yield settings
    for key in redis_client.scan_iter(match=f"{settings.redis_prefix}:*"):
        redis_client.delete(key)


def driver(settings, redis_client) -> BatchDispatcher:
    """One API process's driver, with stores of its own (as another process would have)."""
    jobs = JobStore(redis_client, settings.redis_prefix, settings.job_ttl_s, settings.job_lease_s)
    models = ModelDirectory(jobs, settings.model_remember_s, configured=model_entry(settings))
    return BatchDispatcher(settings, BatchStore(redis_client, settings.redis_prefix),
                           FileStore(redis_client, settings.redis_prefix), jobs, models, lambda record: None)


def new_batch(d: BatchDispatcher) -> str:
    """A batch of LINES requests, still validating."""
    lines = [json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"messages": [{"role": "user", "content": f"Hi {i}"}], "max_tokens": 3}})
             for i in range(LINES)]
    meta = d.files.save_stream(io.BytesIO("\n".join(lines).encode()), "in.jsonl", "batch", "owner")
    return d.batches.create("owner", meta.id, "/v1/chat/completions", "24h", None)["id"]


def started_batch(d: BatchDispatcher) -> str:
    """A batch of LINES requests, validated and fed: every line a queued job."""
    batch_id = new_batch(d)
    d.drive(batch_id)  # validating -> in_progress
    d.drive(batch_id)  # feeds every line
    assert len(line_jobs(d, batch_id)) == LINES
    return batch_id


def line_jobs(d: BatchDispatcher, batch_id: str) -> list[str]:
    return sorted(d.jobs.redis.smembers(d.jobs.keys.batch_inflight(batch_id)))


def complete(jobs: JobStore, job_id: str) -> None:
    _, attempt = jobs.start(job_id, "w")
    result = JobResult(text="ok", finish_reason="stop", usage=Usage(prompt_tokens=1, completion_tokens=1,
                                                                    total_tokens=2))
    assert jobs.write(attempt, [JobEvent(type="delta", text="ok")], Ending.completed(result)).applied


def output_lines(d: BatchDispatcher, batch_id: str) -> list[dict]:
    batch = d.batches.get(batch_id)
    return [json.loads(line) for line in d.jobs.redis.lrange(d.jobs.keys.file_lines(batch["output_list"]), 0, -1)]


def test_two_drivers_at_once_never_duplicate_an_output_line(settings, redis_client):
    """Issue 13, case 8: driver A read which lines were finished, then driver B (its lease came while A was
    slow) collected them all; A went on and appended each line again."""
    a, b = driver(settings, redis_client), driver(settings, redis_client)
    batch_id = started_batch(a)
    for job_id in line_jobs(a, batch_id):
        complete(a.jobs, job_id)
    real_get = a.jobs.get

    def b_collects_first(job_id):
        a.jobs.get = real_get
        b._collect(batch_id)
        return real_get(job_id)

    a.jobs.get = b_collects_first
    a._collect(batch_id)
    lines = output_lines(a, batch_id)
    assert sorted(line["custom_id"] for line in lines) == [f"r{i}" for i in range(LINES)]
    assert a.batches.get(batch_id)["completed"] == LINES


def test_the_batch_lease_is_held_by_one_driver_at_a_time(settings, redis_client):
    a, b = driver(settings, redis_client), driver(settings, redis_client)
    assert a.batches.take_lease("batch_x", a.holder, ttl_ms=200)
    assert not b.batches.take_lease("batch_x", b.holder, ttl_ms=200)
    assert a.batches.take_lease("batch_x", a.holder, ttl_ms=200)  # renewed
    time.sleep(0.3)
    assert b.batches.take_lease("batch_x", b.holder, ttl_ms=200)  # lapsed: b takes it
    assert not a.batches.take_lease("batch_x", a.holder, ttl_ms=200)


def test_cancelling_a_batch_whose_lines_a_lost_worker_requeued(settings, redis_client):
    """Issue 13, case 1, for batches: lines whose attempt published events and then lost its worker are
    queued again; the cancel loop used to stop at the first of them (it ended it with event seq 0), and the
    batch stayed `cancelling`."""
    d = driver(settings, redis_client)
    batch_id = started_batch(d)
    ids = line_jobs(d, batch_id)
    complete(d.jobs, ids[0])
    for job_id in ids[1:3]:  # started, one delta out, then the worker was lost
        _, attempt = d.jobs.start(job_id, "lost-worker")
        assert d.jobs.write(attempt, [JobEvent(type="delta", text="par")]).applied
    time.sleep(0.3)
    assert sorted(j for j, _, _ in d.jobs.reap()) == sorted(ids[1:3])
    BatchService(d.batches, d.files).cancel(batch_id, "owner")
    for _ in range(3):
        d.drive(batch_id)
    batch = d.batches.get(batch_id)
    assert batch["status"] == "cancelled"
    assert [d.jobs.get(j).status for j in ids] == [JobStatus.COMPLETED] + [JobStatus.CANCELLED] * 3
    assert [e.type for e in d.jobs.read_log(ids[1])] == ["delta", "cancelled"]
    assert [line["custom_id"] for line in output_lines(d, batch_id)] == [d.jobs.get(ids[0]).custom_id]


def test_a_cancel_while_the_driver_validates_is_not_overwritten(settings, redis_client):
    """The driver read the batch (validating), the cancel landed, then the driver set it in_progress over
    the cancel and ran it to completion (the fuzzer's `cancelled-at-once` batch, now and then)."""
    d = driver(settings, redis_client)
    batch_id = new_batch(d)
    count_lines = d.files.iter_lines

    def cancelled_meanwhile(file_id):
        BatchService(d.batches, d.files).cancel(batch_id, "owner")
        return count_lines(file_id)

    d.files.iter_lines = cancelled_meanwhile
    d.drive(batch_id)
    assert d.batches.get(batch_id)["status"] == "cancelling"
    d.drive(batch_id)
    batch = d.batches.get(batch_id)
    assert batch["status"] == "cancelled" and line_jobs(d, batch_id) == [] and batch["completed"] == 0


def test_a_cancel_after_the_batch_completed_changes_nothing(settings, redis_client):
    d = driver(settings, redis_client)
    batch_id = started_batch(d)
    for job_id in line_jobs(d, batch_id):
        complete(d.jobs, job_id)
    d.drive(batch_id)  # collects, then finalizes
    assert d.batches.get(batch_id)["status"] == "completed"
    assert BatchService(d.batches, d.files).cancel(batch_id, "owner")["status"] == "completed"
    d.drive(batch_id)
    assert d.batches.get(batch_id)["status"] == "completed"


def test_a_redis_outage_is_one_warning_not_a_traceback_per_tick(settings, caplog):
    """While Redis is away (a failover) the driver ticks every BATCH_TICK_S: one line says so, not one
    traceback per tick."""
    import logging
    import threading

    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
    from scripts.stack import free_port

    dead = redis.Redis(port=free_port(), socket_connect_timeout=0.1, retry=Retry(NoBackoff(), 0))
    d = driver(settings.model_copy(update=dict(batch_tick_s=0.01)), dead)
    caplog.set_level(logging.WARNING, logger="app.batches")
    ticks = []
    d.tick = lambda real=d.tick: ticks.append(1) or (len(ticks) >= 5 and d.stop()) or real()
    runner = threading.Thread(target=d._run)
    runner.start()
    runner.join(10)
    assert len(ticks) >= 5
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "Redis away" in caplog.records[0].message
