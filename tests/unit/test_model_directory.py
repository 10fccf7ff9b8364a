"""The model directory (jobs/models.py) against a real Redis: it lists what live workers advertise, through
the workers index (no keyspace scan), and when its cached copy expires under load, one caller reads Redis
while the others go on with the last copy."""
from __future__ import annotations

import threading
import time
import uuid

import pytest
import redis

from config.settings import Settings
from jobs.models import ModelDirectory, model_entry
from jobs.store import JobStore
from scripts.stack import DEFAULT_REDIS_URL


@pytest.fixture
def store():
    settings = Settings(redis_url=DEFAULT_REDIS_URL, redis_prefix=f"test-models-{uuid.uuid4().hex[:8]}")
    try:
        store = JobStore.from_settings(settings)
        store.redis.ping()
    except redis.RedisError as exc:
        pytest.skip(f"no Redis at {DEFAULT_REDIS_URL}: {exc}")
    store.heartbeat("w1", {"name": "w1", "model_id": settings.served_model_name}, ttl_s=60,
                    model=model_entry(settings))
    yield store
    for key in store.redis.scan_iter(match=f"{settings.redis_prefix}:*"):
        store.redis.delete(key)


def test_live_workers_come_from_the_index_and_leave_it(store):
    store.heartbeat("w2", {"name": "w2"}, ttl_s=0.2)
    assert sorted(w["name"] for w in store.live_workers()) == ["w1", "w2"]
    time.sleep(0.3)  # w2's heartbeat expired
    assert [w["name"] for w in store.live_workers()] == ["w1"]
    store.remove_heartbeat("w1")
    assert store.live_workers() == []


def test_an_expired_copy_is_refreshed_by_one_caller_while_the_others_use_the_last_one(store):
    directory = ModelDirectory(store, remember_s=60, cache_s=0.05)
    first = directory.routes()
    assert [route.live_workers for route in first.values()] == [1]
    reads, release = [], threading.Event()
    read = directory._read

    def slow_read():
        reads.append(1)
        release.wait(5)  # Redis is slow to answer this one
        return read()

    directory._read = slow_read
    time.sleep(0.06)  # the copy expired
    refresher = threading.Thread(target=directory.routes)
    refresher.start()
    while not reads:
        time.sleep(0.001)
    started = time.monotonic()
    others = [directory.routes() for _ in range(20)]  # meanwhile
    assert time.monotonic() - started < 0.5
    assert all(routes is first for routes in others)
    release.set()
    refresher.join(5)
    assert len(reads) == 1
    assert directory.routes() is not first  # the fresh copy
