"""Fair dispatch (jobs/fair_queue.py, jobs/fair_dispatch.py) on a real Redis: jobs wait in per-key queues and
leave them round-robin across keys, only as far as the pool's Celery queue has room; two dispatchers never
send one job twice; a cancel while parked ends the job and removes it; the lost-delivery reaper neither
resends parked jobs nor loses one a dispatcher took and never sent; the caps count parked jobs."""
from __future__ import annotations

import collections
import random
import threading
import time
import uuid

import pytest

from jobs.fair_dispatch import FairDispatcher, LiveSlots
from jobs.records import JobRecord, JobStatus
from jobs.transition import Ending
from tests.unit.conftest import REQUEST


@pytest.fixture
def store(make_store, redis_client):
    store = make_store(lease_s=0.2)
    yield store
    redis_client.delete(queue_of(store))


def queue_of(store) -> str:
    """The stand-in for a pool's Celery queue (a Redis list, as kombu keeps it)."""
    return f"{store.prefix}-celery"


def park(store, owner: str, kind: str = "background") -> str:
    record = JobRecord.new(REQUEST, kind=kind, owner=owner, queue=queue_of(store))
    store.create(record, parked=True)
    return record.id


def celery_send(store, sent: list):
    """A stand-in for Celery's send_task: the message (the job id) at the queue's tail, as kombu puts it."""
    def send(job_id: str, queue: str) -> None:
        store.redis.lpush(queue, job_id)
        sent.append(job_id)
    return send


def test_jobs_leave_round_robin_across_keys_oldest_first(store):
    a = [park(store, "key-a") for _ in range(4)]
    b = [park(store, "key-b") for _ in range(2)]
    c = [park(store, "key-c")]
    assert store.fair.take(queue_of(store), room=100) == [a[0], b[0], c[0], a[1], b[1], a[2], a[3]]
    assert store.fair.take(queue_of(store), room=100) == []


def test_a_key_that_arrives_later_is_next_after_one_job_of_each_waiting_key(store):
    flood = [park(store, "key-a") for _ in range(50)]
    assert store.fair.take(queue_of(store), room=3) == flood[:3]
    late = park(store, "key-b")
    assert store.fair.take(queue_of(store), room=2) == [flood[3], late]


def test_take_fills_only_the_room_left_in_the_celery_queue(store):
    ids = [park(store, "key-a") for _ in range(5)]
    sent = []
    dispatcher = FairDispatcher(store.fair, celery_send(store, sent), margin=3)
    assert dispatcher.pump(queue_of(store)).sent == ids[:3]
    assert dispatcher.pump(queue_of(store)).sent == []  # the queue holds 3 messages: full
    store.redis.rpop(queue_of(store))  # a worker takes one
    assert dispatcher.pump(queue_of(store)).sent == ids[3:4]
    assert store.fair.parked_count(queue_of(store)) == 1


def test_two_dispatchers_racing_send_every_job_exactly_once(store):
    ids = {park(store, f"key-{i % 3}") for i in range(150)}
    sent: list[str] = []
    queue = queue_of(store)
    stop = threading.Event()

    def consume():  # workers taking messages, so that room keeps opening while the dispatchers race
        while not stop.is_set():
            store.redis.rpop(queue)
            time.sleep(random.uniform(0, 0.002))

    def dispatch():
        dispatcher = FairDispatcher(store.fair, celery_send(store, sent), margin=4)
        while store.fair.parked_count(queue) and not stop.is_set():
            dispatcher.pump(queue)

    consumer = threading.Thread(target=consume)
    consumer.start()
    dispatchers = [threading.Thread(target=dispatch) for _ in range(2)]
    for thread in dispatchers:
        thread.start()
    for thread in dispatchers:
        thread.join(timeout=60)
    stop.set()
    consumer.join()
    assert collections.Counter(sent) == collections.Counter(ids)  # each once, none missing
    assert store.fair.parked_count(queue) == 0


def test_a_key_at_its_share_of_the_pool_waits_and_another_keys_job_goes_at_once(store):
    """While another key uses the pool, a flooding key may fill all but the pool's reserved slots, never all:
    the other key's next job goes at once, instead of waiting for one of the flood's jobs to end. The
    flooding key keeps its turn while it waits."""
    first_of_b = park(store, "key-b")
    assert store.fair.take(queue_of(store), room=10, key_cap=3) == [first_of_b]
    flood = [park(store, "key-a") for _ in range(5)]
    assert store.fair.take(queue_of(store), room=10, key_cap=3) == flood[:3]  # 3 in flight: its share
    late = park(store, "key-b")
    assert store.fair.take(queue_of(store), room=10, key_cap=3) == [late]
    assert store.fair.in_flight(queue_of(store), "key-a") == 3
    started, attempt = store.start(flood[0], "w")
    assert store.fair.take(queue_of(store), room=10, key_cap=3) == []  # running: still in flight
    store.write(attempt, [], Ending.cancelled())  # it ends: its key has room again
    assert store.fair.in_flight(queue_of(store), "key-a") == 2
    assert store.fair.take(queue_of(store), room=10, key_cap=3) == [flood[3]]


def test_a_key_alone_on_the_pool_may_use_every_slot(store):
    flood = [park(store, "key-a") for _ in range(5)]
    assert store.fair.take(queue_of(store), room=10, key_cap=3) == flood


def test_a_key_that_has_not_parked_a_job_lately_no_longer_holds_a_reserve(store):
    other = park(store, "key-b")
    assert store.fair.take(queue_of(store), room=10) == [other]
    time.sleep(0.05)
    flood = [park(store, "key-a") for _ in range(4)]
    assert store.fair.take(queue_of(store), room=10, key_cap=2, active_s=0.04) == flood


def test_a_dispatcher_keeps_a_reserve_of_the_pools_live_slots_free_of_any_one_key(store):
    other = park(store, "key-b")
    flood = [park(store, "key-a") for _ in range(6)]
    sent = []
    dispatcher = FairDispatcher(store.fair, celery_send(store, sent), margin=10, reserve=1,
                                capacity=lambda queue: 4)
    assert dispatcher.pump(queue_of(store)).sent == [other, *flood[:3]]
    no_worker = FairDispatcher(store.fair, celery_send(store, sent), margin=10, reserve=1, capacity=lambda q: 0)
    assert no_worker.pump(queue_of(store)).sent == flood[3:6]  # no live slots to share: the margin alone


def test_a_pools_live_slots_are_its_live_workers_concurrency(store):
    store.heartbeat("w1", {"queue": queue_of(store), "concurrency": 8}, ttl_s=60)
    store.heartbeat("w2", {"queue": queue_of(store), "concurrency": 4}, ttl_s=60)
    store.heartbeat("w3", {"queue": "another-pool", "concurrency": 16}, ttl_s=60)
    store.heartbeat("gone", {"queue": queue_of(store), "concurrency": 8}, ttl_s=0.001)
    time.sleep(0.01)  # its heartbeat expired: a dead worker
    slots = LiveSlots(store)
    assert slots(queue_of(store)) == 12 and slots("another-pool") == 16 and slots("nobody's") == 0


def test_in_flight_entries_older_than_the_deadline_are_dropped(store):
    """A job that never ended (its record expired) must not hold its key's share for ever."""
    other, old, new = park(store, "key-b"), park(store, "key-a"), park(store, "key-a")
    assert store.fair.take(queue_of(store), room=10, key_cap=1) == [other, old]
    assert store.fair.take(queue_of(store), room=10, key_cap=1, stale_before=time.time() + 1) == [new]


def offered(store, owner: str, margin: int = 3, key_cap: int = 0, active_s: float = 60.0) -> tuple[str, bool]:
    """A job recorded as the API records it (JobStore.create with the dispatcher's offer); its id, and whether
    it was taken at once."""
    record = JobRecord.new(REQUEST, kind="interactive", owner=owner, queue=queue_of(store))
    dispatcher = FairDispatcher(store.fair, celery_send(store, []), margin=margin, capacity=lambda q: key_cap + 1,
                                reserve=1, active_s=active_s)
    return record.id, store.create(record, parked=True, offer=dispatcher.offer(queue_of(store)))


def test_a_job_arriving_while_nobody_waits_is_taken_as_it_is_recorded(store):
    job_id, taken = offered(store, "key-a")
    assert taken
    assert store.fair.parked_count(queue_of(store)) == 0
    assert store.fair.in_flight(queue_of(store), "key-a") == 1
    assert store.redis.hget(store.keys.job(job_id), "fair") == "sending"  # watched as any taken job: ...
    assert store.reap_lost(stall_s=0) == [(job_id, "interactive", queue_of(store))]  # ... lost if never sent
    store.fair.confirm_sent([job_id])
    assert store.redis.hget(store.keys.job(job_id), "fair") is None


def test_a_job_arriving_behind_parked_jobs_parks_and_keeps_the_rotation(store):
    waiting = park(store, "key-a")
    job_id, taken = offered(store, "key-b")
    assert not taken
    assert store.fair.take(queue_of(store), room=10) == [waiting, job_id]


def test_a_job_arriving_when_celery_has_no_room_parks(store):
    store.redis.rpush(queue_of(store), "m1", "m2", "m3")
    job_id, taken = offered(store, "key-a", margin=3)
    assert not taken and store.fair.parked_count(queue_of(store)) == 1
    store.redis.rpop(queue_of(store))
    assert offered(store, "key-a", margin=3)[1] is False  # one of its key's jobs waits: behind it, in turn


def test_a_job_arriving_at_its_keys_share_parks_while_another_key_is_active(store):
    assert offered(store, "key-b", margin=10, key_cap=2)[1]  # another key on the pool lately
    first, second = offered(store, "key-a", margin=10, key_cap=2), offered(store, "key-a", margin=10, key_cap=2)
    assert first[1] and second[1]
    third, taken = offered(store, "key-a", margin=10, key_cap=2)
    assert not taken  # two in flight: its share while key-b is active
    assert store.fair.take(queue_of(store), room=10, key_cap=2) == []
    alone = FairDispatcher(store.fair, celery_send(store, []), margin=10)
    assert alone.fair.take(queue_of(store), room=10, key_cap=0) == [third]


def test_a_start_and_an_end_say_whether_jobs_wait_parked_on_the_pool(store):
    """What lets a worker skip pumping a pool with nothing parked (workers/tasks.py): the word of the
    transitions it makes anyway."""
    job_id, taken = offered(store, "key-a")
    started, attempt, _ = store.start_with_record(job_id, "w")
    assert started.parked is False
    waiting = park(store, "key-b", kind="interactive")
    assert store.write(attempt, [], Ending.cancelled()).parked is True  # key-b's job waits: pump
    store.fair.take(queue_of(store), room=10)
    started, attempt, _ = store.start_with_record(waiting, "w")
    assert started.parked is False and store.write(attempt, [], Ending.cancelled()).parked is False


def test_a_job_cancelled_while_parked_ends_and_is_never_sent(store):
    first, cancelled, last = park(store, "key-a"), park(store, "key-a"), park(store, "key-b")
    assert store.cancel(cancelled).applied
    assert store.get(cancelled).status == JobStatus.CANCELLED
    assert [e.type for e in store.read_log(cancelled)] == ["cancelled"]
    assert store.fair.parked_count(queue_of(store)) == 2
    assert store.fair.parked_by_owner(queue_of(store)) == {"key-a": 1, "key-b": 1}
    assert store.fair.take(queue_of(store), room=10) == [first, last]


def test_a_key_whose_only_parked_job_was_cancelled_leaves_the_rotation(store):
    only = park(store, "key-a")
    store.cancel(only)
    assert store.fair.parked_by_owner(queue_of(store)) == {}
    later = [park(store, "key-b"), park(store, "key-a")]
    assert store.fair.take(queue_of(store), room=10) == later


def test_reap_lost_leaves_parked_jobs_alone(store):
    """Parked jobs have no message yet, whatever the Celery queue holds: not lost, and still there."""
    ids = [park(store, "key-a") for _ in range(3)]
    assert store.reap_lost(stall_s=0) == []
    assert store.fair.parked_count(queue_of(store)) == 3
    assert store.fair.take(queue_of(store), room=10) == ids


def test_a_job_a_dispatcher_took_and_never_sent_is_resent_by_reap_lost(store):
    """The dispatcher died between its move and the send (or the send failed): the job is watched again from
    the move, and the reaper sends it once it is overdue, however busy the Celery queue is."""
    taken, waiting = park(store, "key-a"), park(store, "key-a")
    assert store.fair.take(queue_of(store), room=1) == [taken]
    store.redis.rpush(queue_of(store), "other jobs' messages")
    assert store.reap_lost(stall_s=0) == [(taken, "background", queue_of(store))]
    assert store.fair.parked_count(queue_of(store)) == 1  # the other one still waits its turn
    store.fair.confirm_sent([taken])  # the reaper's send went through
    assert store.reap_lost(stall_s=0) == []
    assert store.fair.take(queue_of(store), room=10) == [waiting]


def test_a_confirmed_send_is_watched_like_any_sent_job(store):
    job_id = park(store, "key-a")
    sent = []
    FairDispatcher(store.fair, celery_send(store, sent), margin=2).pump(queue_of(store))
    assert sent == [job_id]
    assert store.reap_lost(stall_s=0) == []  # its message is in the queue
    store.redis.delete(queue_of(store))  # ... and then it is not (a worker took it and died)
    assert [j for j, _, _ in store.reap_lost(stall_s=0)] == [job_id]


def test_a_failed_send_is_reported_and_the_job_left_to_reap_lost(store):
    job_id = park(store, "key-a")

    def broken(job_id: str, queue: str) -> None:
        raise ConnectionError("broker away")

    pumped = FairDispatcher(store.fair, broken, margin=2).pump(queue_of(store))
    assert (pumped.sent, pumped.unsent) == ([], [job_id])
    assert [j for j, _, _ in store.reap_lost(stall_s=0)] == [job_id]


def test_a_started_job_leaves_its_parked_queue(store):
    """A stray message (an old delivery) may start a parked job: it leaves the queue, it is not sent again."""
    job_id, other = park(store, "key-a"), park(store, "key-a")
    started, _ = store.start(job_id, "w")
    assert started.applied
    assert store.fair.parked_count(queue_of(store)) == 1
    assert store.fair.take(queue_of(store), room=10) == [other]


def test_a_dead_workers_job_goes_straight_back_to_celery_not_behind_its_keys_backlog(store):
    job_id = park(store, "key-a")
    backlog = [park(store, "key-a") for _ in range(3)]
    assert store.fair.take(queue_of(store), room=1) == [job_id]
    store.fair.confirm_sent([job_id])
    store.start(job_id, "w")
    time.sleep(0.3)  # its lease lapses: the worker died
    assert store.reap() == [(job_id, "background", queue_of(store))]  # the reaper sends it itself
    assert store.fair.parked_count(queue_of(store)) == 3
    assert store.fair.take(queue_of(store), room=10) == backlog


def test_caps_count_parked_jobs(store):
    for _ in range(3):
        park(store, "key-a")
    park(store, "key-b")
    store.fair.take(queue_of(store), room=1)
    store.redis.lpush(queue_of(store), "its message")
    depth, unfinished = store.admission_counts(queue_of(store), "key-a", older_than_s=3600)
    assert (depth, unfinished) == (4, 3)  # 1 in Celery's queue + 3 parked; key-a's 3, parked or sent


def test_an_unknown_queue_on_an_empty_redis_has_nothing_parked(store):
    queue = f"never-used-{uuid.uuid4().hex[:6]}"
    assert store.fair.take(queue, room=5) == []
    assert store.fair.parked_count(queue) == 0 and store.fair.parked_by_owner(queue) == {}
    assert store.admission_counts(queue, "key-a", older_than_s=60) == (0, 0)


def test_a_parked_job_that_ended_otherwise_is_skipped(store):
    """Belt and braces: an id left in a key's queue whose job is over (or expired) is dropped, not sent."""
    gone, done, kept = park(store, "key-a"), park(store, "key-a"), park(store, "key-a")
    store.redis.delete(store.keys.job(gone))
    store.redis.hset(store.keys.job(done), "status", "completed")
    assert store.fair.take(queue_of(store), room=10) == [kept]
    assert store.fair.parked_count(queue_of(store)) == 0
    assert store.end(kept, Ending.cancelled()).applied  # sent, never started: it can still be cancelled


# --- through the API (the Flask app, a stand-in for Celery that only queues messages)
KEY_A, KEY_B = "sk-fair-key-a-123456", "sk-fair-key-b-654321"


@pytest.fixture
def fair_api(redis_client):
    """The app with a Celery queue nobody consumes: 2 messages fill it (margin 2), the rest park."""
    from app import create_app
    from config.settings import Settings
    from jobs.models import model_entry
    from tests.conftest import REDIS_URL

    settings = Settings(redis_url=REDIS_URL, redis_prefix=f"unit-{uuid.uuid4().hex[:8]}", api_keys=[KEY_A, KEY_B],
                        interactive_queue=f"iq-{uuid.uuid4().hex[:8]}", fair_dispatch_margin=2, max_queued_jobs=5,
                        max_unfinished_per_key=3)
    app = create_app(settings, enqueue=lambda record: redis_client.lpush(record.queue, record.id),
                     drive_batches=False)
    store = app.extensions["chat_service"].store
    store.heartbeat("w", {"model_id": settings.served_model_name, "concurrency": 1}, ttl_s=60,
                    model=model_entry(settings))
    yield app, store, settings.interactive_queue
    for key in redis_client.scan_iter(match=f"{settings.redis_prefix}:*"):
        redis_client.delete(key)
    redis_client.delete(settings.interactive_queue)


def submit(client, key: str):
    return client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                       json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "background": True})


def test_the_api_caps_count_parked_jobs_with_openai_shaped_429s(fair_api):
    from app.auth import owner_of

    app, store, queue = fair_api
    client = app.test_client()
    a_jobs = [submit(client, KEY_A).json["id"] for _ in range(3)]  # 2 sent (the queue's room), 1 parked
    assert store.redis.llen(queue) == 2 and store.fair.parked_by_owner(queue) == {owner_of(KEY_A): 1}
    too_many = submit(client, KEY_A)  # the key's 3 unfinished: parked ones count
    assert too_many.status_code == 429 and too_many.json["error"]["code"] == "too_many_jobs"
    assert set(too_many.json["error"]) == {"message", "type", "param", "code"} and too_many.headers["Retry-After"]
    assert [submit(client, KEY_B).status_code for _ in range(2)] == [202, 202]  # 2 + 3 parked = 5 waiting
    full = submit(client, KEY_B)
    assert full.status_code == 429 and full.json["error"]["code"] == "queue_full" and full.headers["Retry-After"]
    assert set(full.json["error"]) == {"message", "type", "param", "code"}

    # A cancel of a parked job answers the job, cancelled; it leaves its key's queue, and makes room.
    cancelled = client.post(f"/v1/chat/completions/{a_jobs[2]}/cancel", headers={"Authorization": f"Bearer {KEY_A}"})
    assert cancelled.status_code == 200 and cancelled.json["status"] == "cancelled"
    assert store.fair.parked_by_owner(queue) == {owner_of(KEY_B): 2}
    assert submit(client, KEY_B).status_code == 202


def test_metrics_show_parked_jobs_per_key_fingerprint_never_the_key(fair_api):
    from app.auth import owner_of

    app, store, queue = fair_api
    client = app.test_client()
    for key, count in ((KEY_A, 3), (KEY_B, 2)):
        for _ in range(count):
            assert submit(client, key).status_code == 202
    registry = app.extensions["metrics_registry"]
    model = app.config["SETTINGS"].served_model_name
    parked = {owner: registry.get_sample_value("llmq_parked_jobs", {"model": model, "queue": queue, "owner": owner})
              for owner in (owner_of(KEY_A), owner_of(KEY_B))}
    assert parked == {owner_of(KEY_A): 1, owner_of(KEY_B): 2}  # A's first 2 are in Celery's queue
    text = client.get("/metrics").get_data(as_text=True)
    assert "llmq_parked_jobs" in text and KEY_A not in text and KEY_B not in text
