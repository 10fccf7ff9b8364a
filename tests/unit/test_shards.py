"""The sharded job store (jobs/shards.py) on three shards: three databases of the test Redis, under one fresh
prefix (what three Redis processes would hold; tests/integration/test_shards.py runs the service on those).
Each job's keys are on the shard its id picks and nowhere else, batched writes and sweeps reach every shard,
and what spans jobs (admission counts, listings, metrics, fair dispatch's room) is added up or merged."""
from __future__ import annotations

import time
import uuid
from typing import Optional

import pytest
import redis

from jobs.records import JobEvent, JobRecord, JobStatus
from jobs.shards import ShardedJobStore, new_id_on, shard_index
from jobs.store import JobStore
from jobs.transition import Ending, Outcome, Write
from tests.conftest import REDIS_URL
from tests.unit.conftest import REQUEST

DATABASES = (9, 10, 11)


@pytest.fixture
def sharded():
    prefix = f"unit-{uuid.uuid4().hex[:8]}"
    base = REDIS_URL.rsplit("/", 1)[0]
    clients = [redis.Redis.from_url(f"{base}/{db}", decode_responses=True) for db in DATABASES]
    store = ShardedJobStore([JobStore(client, prefix, ttl_s=600, lease_s=5) for client in clients])
    yield store
    for client in clients:
        for key in client.scan_iter(match=f"{prefix}:*"):
            client.delete(key)
        for key in client.scan_iter(match=f"{prefix}-*"):
            client.delete(key)


def new_job(store: ShardedJobStore, kind: str = "background", owner: str = "o", created_at: float = None,
            parked: bool = False, shard: Optional[int] = None) -> JobRecord:
    """A new job, on `shard` if given (else where its random id lands)."""
    job_id = None if shard is None else new_id_on(JobRecord.new_id, shard, len(store.shards))
    record = JobRecord.new(REQUEST, id=job_id, kind=kind, owner=owner, queue=f"{store.prefix}-q")
    if created_at is not None:
        record.created_at = created_at
    store.create(record, parked=parked)
    return record


def holders(store: ShardedJobStore, key_of) -> list[int]:
    return [i for i, shard in enumerate(store.shards) if shard.redis.exists(key_of(shard.keys))]


def test_ids_pick_their_shard_and_colocated_ids_share_it():
    ids = [f"chatcmpl-{uuid.uuid4().hex}" for _ in range(300)]
    counts = [sum(shard_index(i, 3) == s for i in ids) for s in range(3)]
    assert min(counts) > 60  # spread: about 100 each
    assert all(shard_index(i, 1) == 0 for i in ids)
    assert shard_index(new_id_on(lambda: f"batch_{uuid.uuid4().hex}", 2, 3), 3) == 2


def test_a_jobs_keys_live_on_its_shard_only(sharded):
    records = [new_job(sharded) for _ in range(30)]
    assert {sharded.index_of(r.id) for r in records} == {0, 1, 2}
    for record in records:
        home = sharded.index_of(record.id)
        assert holders(sharded, lambda keys: keys.job(record.id)) == [home]
        assert sharded.get(record.id).id == record.id
        done, attempt = sharded.start(record.id, "w")
        assert done.applied
        sharded.request_cancel(record.id)
        assert sharded.write(attempt, [JobEvent(type="delta", text="hi")]).cancel_requested
        assert holders(sharded, lambda keys: keys.event_log(record.id)) == [home]
        assert holders(sharded, lambda keys: keys.lease(record.id)) == [home]
        assert holders(sharded, lambda keys: keys.cancel(record.id)) == [home]


def test_batched_writes_and_renewals_reach_every_shard_in_order(sharded):
    records = [new_job(sharded) for _ in range(12)]
    attempts = [sharded.start(r.id, "w")[1] for r in records]
    writes = [Write(a, [JobEvent(type="delta", text=f"t{i}")]) for i, a in enumerate(attempts)]
    writes[3] = Write(attempts[3], [JobEvent(type="delta", text="end")], Ending.cancelled())
    answers = sharded.write_many(writes)
    assert [a.outcome for a in answers] == [Outcome.APPLIED] * 12
    for i, record in enumerate(records):
        status, events = sharded.status_and_log(record.id)
        assert events[0].text == ("end" if i == 3 else f"t{i}")
        assert status == (JobStatus.CANCELLED if i == 3 else JobStatus.IN_PROGRESS)
    lost = sharded.renew(attempts)
    assert lost == [attempts[3]]  # ended: its lease is gone; every other shard renewed its own


def test_sweeps_visit_every_shard(sharded):
    records = [new_job(sharded) for _ in range(12)]
    for shard in sharded.shards:  # leases of 0 ms: lapsed at once
        shard.lease_ms = 1
    for record in records:
        sharded.start(record.id, "w")
    time.sleep(0.05)
    requeued = {job_id for job_id, _, _ in sharded.reap()}
    assert requeued == {r.id for r in records}


def test_counts_and_listings_span_shards(sharded):
    records = [new_job(sharded, owner="o", created_at=time.time() - 100 + i) for i in range(10)]
    new_job(sharded, owner="other")
    waiting, unfinished = sharded.admission_counts(f"{sharded.prefix}-q", "o", older_than_s=3600)
    assert unfinished == 10
    page, more = sharded.list_owner_jobs("o", limit=4)
    newest_first = [r.id for r in reversed(records)]
    assert (page, more) == (newest_first[:4], True)
    page2, more2 = sharded.list_owner_jobs("o", limit=4, after=page[-1])
    page3, more3 = sharded.list_owner_jobs("o", limit=4, after=page2[-1])
    assert page2 == newest_first[4:8] and more2 and page3 == newest_first[8:] and not more3
    assert all(sharded.owns("o", r.id) for r in records) and not sharded.owns("other", records[0].id)
    current, entered = sharded.job_counts()
    assert current["queued"] == 11 and entered["queued"] == 11


def test_fair_dispatch_takes_from_every_shard_within_one_room(sharded):
    queue = f"{sharded.prefix}-q"
    parked = [new_job(sharded, kind="interactive", parked=True, shard=i % 3) for i in range(9)]
    assert sharded.fair.parked_count(queue) == 9
    sharded.redis.rpush(queue, "m1", "m2")  # two messages already in Celery's list (the home node's)
    taken = sharded.fair.take(queue, room=6)
    assert len(taken) == 4  # the room less what Celery holds, over all shards together
    sharded.fair.confirm_sent(taken)
    taken += sharded.fair.take(queue, room=100)
    assert sorted(taken) == sorted(r.id for r in parked)
    assert all(sharded.get(job_id).status == JobStatus.QUEUED for job_id in taken)
    # Over several shards a start cannot see the others' parked jobs: it says nothing (the worker pumps).
    assert sharded.start_with_record(taken[0], "w")[0].parked is None


def test_one_shard_apart_from_home_takes_within_the_home_brokers_room():
    """REDIS_SHARDS naming one Redis that is not REDIS_URL's (job state on its own node, the broker on home): the
    room is what Celery's list on home holds, not the shard's own (empty) list."""
    prefix = f"unit-{uuid.uuid4().hex[:8]}"
    base = REDIS_URL.rsplit("/", 1)[0]
    home_client, shard_client = (redis.Redis.from_url(f"{base}/{db}", decode_responses=True) for db in DATABASES[:2])
    store = ShardedJobStore([JobStore(shard_client, prefix, ttl_s=600, lease_s=5)],
                            home=JobStore(home_client, prefix, ttl_s=600, lease_s=5))
    queue = f"{prefix}-q"
    try:
        for _ in range(4):
            new_job(store, kind="interactive", parked=True)
        home_client.rpush(queue, "m1", "m2")  # two messages in Celery's list, on home
        assert len(store.fair.take(queue, room=3)) == 1
    finally:
        for client in (home_client, shard_client):
            for key in [*client.scan_iter(match=f"{prefix}:*"), *client.scan_iter(match=f"{prefix}-*")]:
                client.delete(key)


def test_heartbeats_reach_every_shard_and_workers_are_read_from_home(sharded):
    sharded.heartbeat("w1", {"name": "w1", "queue": "q", "concurrency": 2}, ttl_s=30)
    assert all(shard.redis.zscore(shard.keys.workers(), "w1") for shard in sharded.shards)
    assert [w["name"] for w in sharded.live_workers()] == ["w1"]
    sharded.ping()
    sharded.remove_heartbeat("w1")
    assert not any(shard.redis.zscore(shard.keys.workers(), "w1") for shard in sharded.shards)


def test_a_shard_away_does_not_stop_the_others_leases_or_sweeps(sharded):
    from scripts.stack import free_port
    from jobs.transition import Attempt
    from redis.backoff import NoBackoff
    from redis.retry import Retry
    dead = JobStore(redis.Redis(port=free_port(), socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0),
                                decode_responses=True),
                    sharded.prefix, ttl_s=600, lease_s=5)
    store = ShardedJobStore([sharded.shards[0], dead])
    make = lambda: f"chatcmpl-{uuid.uuid4().hex}"  # noqa: E731
    record = JobRecord.new(REQUEST, kind="background", owner="o", queue=f"{store.prefix}-q")
    record.id = new_id_on(make, 0, 2)
    store.create(record)
    _, alive = store.start(record.id, "w")
    stranded = Attempt(new_id_on(make, 1, 2), "token")
    assert store.renew([alive, stranded]) == []  # the live shard's lease renewed; the dead one's skipped
    assert store.reap() == [] and store.reap_lost(0.0) == []
    store.heartbeat("w1", {"name": "w1"}, ttl_s=30)
    assert [w["name"] for w in store.live_workers()] == ["w1"]
    with pytest.raises(redis.ConnectionError):
        ShardedJobStore([dead]).reap()  # every shard away: as one JobStore


def test_lost_deliveries_judge_a_queue_by_the_brokers_list_on_every_shard(sharded):
    """A job sent a while ago and not received by any worker is lost only if its Celery list is empty: that
    list is on the home node, not on the job's shard (where it would always look empty)."""
    queue = f"{sharded.prefix}-q"
    records = [new_job(sharded, created_at=time.time() - 60, shard=i % 3) for i in range(12)]
    sharded.redis.rpush(queue, "a message ahead of them")
    assert sharded.reap_lost(stall_s=5) == []  # the queue is busy: they wait their turn
    sharded.redis.delete(queue)
    assert sorted(job_id for job_id, _, _ in sharded.reap_lost(stall_s=5)) == sorted(r.id for r in records)
