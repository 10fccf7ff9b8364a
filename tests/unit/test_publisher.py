"""The worker's publisher with the real pieces below it: the job store on a real Redis, the engine with the
real tiny model, the real tokenizer. What it must never do: let a stale attempt of a job hide, wait on or
cancel a newer attempt on the same worker, or let one run's failed write stop every other run."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from jobs.chat_format import raw_tokenizer
from jobs.records import JobStatus
from workers.engine.config import EngineConfig
from workers.engine.engine import Engine
from workers.job_runner import JobRun, Published
from workers.model_loader import build_tiny_random
from workers.publisher import Publisher
from tests.unit.conftest import REQUEST, new_job

pytestmark = pytest.mark.usefixtures("one_torch_thread")
DEADLINE_S = 600.0


@pytest.fixture(scope="module")
def engine():
    engine = Engine(build_tiny_random(), torch.device("cpu"), eos_token_id=raw_tokenizer().eos_id,
                    config=EngineConfig(num_kv_blocks=128))
    real_run = engine.runner.run

    def paced_run(batch):  # a few ms a step, so that a run is still going when the test acts on it
        time.sleep(0.004)
        return real_run(batch)

    engine.runner.run = paced_run
    yield engine
    engine.shutdown()


@pytest.fixture
def store(make_store):
    return make_store(lease_s=30)


@pytest.fixture
def publisher(store, engine):
    return Publisher(store, engine, retry_s=5.0)


def new_long_job(store) -> str:
    return new_job(store, request=REQUEST.model_copy(update=dict(prompt_token_ids=[1, 733, 1000, 2000],
                                                                  max_tokens=120)))


class RunThread(threading.Thread):
    """One job's Celery thread: starts an attempt and waits in the publisher until it is over."""

    def __init__(self, store, publisher, job_id):
        super().__init__(daemon=True)
        self.store, self.publisher, self.job_id = store, publisher, job_id
        started, self.attempt = store.start(job_id, "worker-under-test")
        assert started.applied
        self.number = started.detail[0]
        self.status = None

    def run(self) -> None:
        record = self.store.get(self.job_id)
        published = Published.read(self.store, self.job_id) if self.number > 1 else Published()
        run = JobRun(record, self.attempt, raw_tokenizer(), published, record.created_at + DEADLINE_S, DEADLINE_S)
        self.status = self.publisher.run(run)


def run_to_end(store, publisher, job_id, timeout=60.0) -> str:
    thread = RunThread(store, publisher, job_id)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive()
    return thread.status


def wait_for(condition, timeout=30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_two_attempts_of_one_job_on_one_worker(store, publisher, engine):
    """Issue 13, case 2: a Redis outage longer than the lease gives the job to a second attempt, on this same
    worker, while the first still runs. Exactly one finishes, with the text of a clean run; the stale one is
    fenced and leaves the engine; neither thread waits forever."""
    clean = new_long_job(store)
    assert run_to_end(store, publisher, clean) == "completed"
    expected = store.get(clean).result

    job_id = new_long_job(store)
    first = RunThread(store, publisher, job_id)
    first.start()
    wait_for(lambda: store.read_log(job_id))  # the first attempt is streaming
    store.redis.delete(store.keys.lease(job_id))  # its lease lapsed while Redis was away
    store.redis.zadd(store.keys.leases(), {job_id: 0})
    assert [j for j, _, _ in store.reap()] == [job_id]
    second = RunThread(store, publisher, job_id)
    second.start()
    for thread in (first, second):
        thread.join(60)
        assert not thread.is_alive(), "an attempt's thread is still waiting"
    assert (first.status, second.status) == ("fenced", "completed")
    record = store.get(job_id)
    assert record.status == JobStatus.COMPLETED and record.attempts == 2
    assert record.result == expected  # not cut short by the stale attempt's cancel
    events = store.read_log(job_id)
    assert [e.seq for e in events] == list(range(len(events))) and events[-1].type == "done"
    assert "".join(e.text for e in events) == expected.text
    wait_for(lambda: engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0)


def test_one_runs_failed_write_fails_that_run_alone(store, publisher):
    """Issue 13, case 6: a script error for one run (here its event log is not a stream) used to fail the
    publisher's whole cycle, every cycle: no run of the worker got anywhere."""
    good, bad = new_long_job(store), new_long_job(store)
    store.redis.set(store.keys.event_log(bad), "not a stream")
    threads = [RunThread(store, publisher, job_id) for job_id in (good, bad)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive()
    assert threads[0].status == "completed" and store.get(good).status == JobStatus.COMPLETED
    assert threads[1].status == "abandoned"  # its end could not be written either: its lease lapses
    assert store.get(bad).status == JobStatus.IN_PROGRESS


def test_a_shard_away_holds_up_only_its_own_runs(store, engine, tmp_path):
    """Job state on two shards (jobs/shards.py), the second a redis-server of its own that is stopped while
    both jobs stream: the job on the first shard finishes meanwhile; the other's events wait, and once its shard
    is back its job finishes too, its log whole and equal to its text."""
    from jobs.shards import ShardedJobStore, new_id_on
    from jobs.records import JobRecord
    from jobs.store import JobStore
    from scripts.stack import RedisServer
    from tests.unit.conftest import REQUEST
    import redis as redis_py

    server = RedisServer(tmp_path / "shard1")
    server.start()
    try:
        away = JobStore(redis_py.Redis.from_url(server.url, decode_responses=True, socket_timeout=1,
                                                socket_connect_timeout=0.5), store.prefix, ttl_s=600, lease_s=30)
        sharded = ShardedJobStore([store, away])
        publisher = Publisher(sharded, engine, retry_s=60.0)
        request = REQUEST.model_copy(update=dict(prompt_token_ids=[1, 733, 1000, 2000], max_tokens=120))
        ids = []
        for shard in (0, 1):
            record = JobRecord.new(request, kind="background", owner="o", queue=f"{store.prefix}-q")
            record.id = new_id_on(lambda: f"chatcmpl-{__import__('uuid').uuid4().hex}", shard, 2)
            sharded.create(record)
            ids.append(record.id)
        threads = [RunThread(sharded, publisher, job_id) for job_id in ids]
        for thread in threads:
            thread.start()
        wait_for(lambda: all(sharded.read_log(job_id) for job_id in ids))
        server.stop()  # SIGTERM: its AOF is whole
        threads[0].join(60)
        assert threads[0].status == "completed"   # not held up by the other shard's outage
        assert threads[1].is_alive()              # its events wait for its shard
        server.start()
        threads[1].join(60)
        assert threads[1].status == "completed"
        for job_id in ids:
            record, events = sharded.get(job_id), sharded.read_log(job_id)
            assert [e.seq for e in events] == list(range(len(events))) and events[-1].type == "done"
            assert "".join(e.text or "" for e in events) == record.result.text
    finally:
        server.stop()
