"""The model directory (jobs/models.py) against a real Redis: it lists what live workers advertise, through
the workers index (no keyspace scan), and when its cached copy expires under load, one caller reads Redis
while the others go on with the last copy. The model the API's own settings name is known from the start,
before any worker has advertised it, and for good."""
from __future__ import annotations

import json
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
def settings():
    run_id = uuid.uuid4().hex[:8]
    return Settings(redis_url=DEFAULT_REDIS_URL, redis_prefix=f"test-models-{run_id}",
                    interactive_queue=f"interactive-{run_id}", batch_queue=f"batch-{run_id}")


@pytest.fixture
def empty_store(settings):
    """A store whose prefix holds nothing yet: no worker has ever advertised a model."""
    try:
        store = JobStore.from_settings(settings)
        store.redis.ping()
    except redis.RedisError as exc:
        pytest.skip(f"no Redis at {DEFAULT_REDIS_URL}: {exc}")
    yield store
    for key in store.redis.scan_iter(match=f"{settings.redis_prefix}:*"):
        store.redis.delete(key)


@pytest.fixture
def store(empty_store, settings):
    """One live worker of the configured model."""
    heartbeat(empty_store, settings, "w1")
    return empty_store


def heartbeat(store, settings, name, concurrency=4, ttl_s=60):
    store.heartbeat(name, {"name": name, "model_id": settings.served_model_name, "concurrency": concurrency},
                    ttl_s=ttl_s, model=model_entry(settings))


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


def test_the_configured_model_is_known_before_any_worker(empty_store, settings):
    directory = ModelDirectory(empty_store, remember_s=60, configured=model_entry(settings))
    for name in (settings.served_model_name, settings.served_model_aliases[0].upper()):
        route = directory.resolve(name)
        assert route is not None, name
        assert (route.id, route.queue, route.batch_queue) == (
            settings.served_model_name, settings.interactive_queue, settings.batch_queue)
        assert (route.live_workers, route.slots) == (0, 0)  # its requests wait in its queue
    assert directory.resolve("gpt-4o") is None  # a model nobody configured or served: still unknown
    assert [route.id for route in directory.listed()] == [settings.served_model_name]


def test_the_configured_model_counts_its_live_workers_and_their_slots(empty_store, settings):
    directory = ModelDirectory(empty_store, remember_s=60, configured=model_entry(settings), cache_s=0)
    heartbeat(empty_store, settings, "w1", concurrency=4)
    heartbeat(empty_store, settings, "w2", concurrency=2)
    route = directory.resolve(settings.served_model_name)
    assert (route.live_workers, route.slots) == (2, 6)


def test_the_configured_model_is_never_forgotten(empty_store, settings):
    directory = ModelDirectory(empty_store, remember_s=60, configured=model_entry(settings), cache_s=0)
    stale = {**model_entry(settings), "last_seen": time.time() - 3600}  # its workers left an hour ago
    empty_store.redis.hset(empty_store.keys.models(), settings.served_model_name, json.dumps(stale))
    assert directory.resolve(settings.served_model_name).queue == settings.interactive_queue


def test_a_pool_that_advertises_the_configured_model_routes_it(empty_store, settings):
    """Its workers say where they listen: their queues win over this process's settings."""
    directory = ModelDirectory(empty_store, remember_s=60, configured=model_entry(settings), cache_s=0)
    pool = settings.model_copy(update={"interactive_queue": "elsewhere", "batch_queue": "elsewhere-batch"})
    heartbeat(empty_store, pool, "w1")
    route = directory.resolve(settings.served_model_name)
    assert (route.queue, route.batch_queue, route.live_workers) == ("elsewhere", "elsewhere-batch", 1)


def test_other_pools_are_forgotten_after_remember_s(empty_store, settings):
    directory = ModelDirectory(empty_store, remember_s=60, configured=model_entry(settings), cache_s=0)
    other = settings.model_copy(update={"served_model_name": "other-model", "served_model_aliases": []})
    heartbeat(empty_store, other, "w-other", ttl_s=0.5)
    assert directory.resolve("other-model").live_workers == 1
    assert sorted(route.id for route in directory.listed()) == sorted(["other-model", settings.served_model_name])
    time.sleep(0.6)  # its heartbeat expired
    assert directory.resolve("other-model").live_workers == 0  # a restart: its requests still wait
    assert [route.id for route in directory.listed()] == [settings.served_model_name]  # but it is not listed
    entry = json.loads(empty_store.redis.hget(empty_store.keys.models(), "other-model"))
    empty_store.redis.hset(empty_store.keys.models(), "other-model",
                           json.dumps({**entry, "last_seen": time.time() - 61}))
    assert directory.resolve("other-model") is None
