"""The API's relay on a real Redis. The event hub: one pattern subscription delivers each job's events to that
job's listeners only, and after its connection drops it reconnects and tells every listener to resync. The
relay: a job's events exactly once, whatever happens between its reads."""
from __future__ import annotations

import queue
import threading
import time
import uuid

import pytest
import redis

from app.relay import RESYNC, EventHub, EventRelay
from jobs.records import GenerationRequest, JobEvent, JobRecord, JobResult, JobStatus, Usage
from jobs.store import JobStore
from jobs.transition import Ending
from tests.conftest import REDIS_URL


@pytest.fixture
def hub():
    name = f"unit-{uuid.uuid4().hex[:8]}"  # also the connections' client name, so the test can find them
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True, client_name=name)
    return EventHub(JobStore(client, name, ttl_s=60), retry_pause_s=0.1)


def next_item(inbox, timeout=5.0):
    return inbox.get(timeout=timeout)


def test_each_job_gets_its_own_events_after_a_first_resync(hub, redis_client):
    a, b = hub.listen("job-a"), hub.listen("job-b")
    assert next_item(a) is RESYNC and next_item(b) is RESYNC  # subscribed: from here on nothing is missed
    redis_client.publish(hub.store.keys.events("job-a"), '{"n": 1}')
    redis_client.publish(hub.store.keys.events("job-b"), '{"n": 2}')
    redis_client.publish(hub.store.keys.events("job-c"), '{"n": 3}')  # nobody listens here: dropped
    assert next_item(a) == '{"n": 1}' and next_item(b) == '{"n": 2}'
    hub.unlisten("job-a", a)
    redis_client.publish(hub.store.keys.events("job-a"), '{"n": 4}')
    redis_client.publish(hub.store.keys.events("job-b"), '{"n": 5}')
    assert next_item(b) == '{"n": 5}'
    with pytest.raises(queue.Empty):
        a.get(timeout=0.2)


def test_a_dropped_connection_is_remade_and_every_listener_resyncs(hub, redis_client):
    inbox = hub.listen("job-a")
    assert next_item(inbox) is RESYNC and hub.down_for() == 0
    ours = [c["id"] for c in redis_client.client_list(_type="pubsub") if c["name"] == hub.store.prefix]
    assert len(ours) == 1  # one connection for every stream of the process
    redis_client.client_kill_filter(_id=ours[0])  # what a Redis restart does to the hub
    assert next_item(inbox) is RESYNC  # reconnected: whatever was published meanwhile is in the log
    redis_client.publish(hub.store.keys.events("job-a"), '{"n": 1}')
    assert next_item(inbox) == '{"n": 1}'
    assert hub.down_for() == 0


def test_a_job_finishing_while_its_log_is_read_still_ends_with_its_final_event(hub):
    """A finish that lands right after the relay's first read (of the job's status and its log) must not
    pass unseen: read the other way round (log, then status) it would end the stream with [DONE] and no
    final event."""
    store = hub.store
    request = GenerationRequest(model="m", prompt_token_ids=[1], max_tokens=2, temperature=0.0, top_p=1.0,
                                frequency_penalty=0.0, presence_penalty=0.0, seed=0)
    record = JobRecord.new(request, kind="interactive", owner="o", queue="q")
    store.create(record)
    _, attempt = store.start(record.id, "w")
    store.write(attempt, [JobEvent(type="delta", text="Hi")])
    status_and_log = store.status_and_log

    def read_then_the_job_finishes(*args, **kwargs):
        status, events = status_and_log(*args, **kwargs)
        if store.get(record.id).status == JobStatus.IN_PROGRESS:
            usage = Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2)
            store.write(attempt, [], Ending.completed(JobResult(text="Hi", finish_reason="stop", usage=usage)),
                        acknowledged=1)
        return status, events

    store.status_and_log = read_then_the_job_finishes
    relay = EventRelay(store, hub, record.id, after_seq=-1, keepalive_s=0.2)
    try:
        events = [e for e in relay.events(deadline=time.monotonic() + 10) if e is not None]
    finally:
        relay.close()
    assert [(e.seq, e.type) for e in events] == [(0, "delta"), (1, "done")]


def _finished_job_events(store, hub, new_job: bool, written=None) -> tuple[list, int]:
    """A new job's relay, listening before the job exists (as the API's create does), then the job runs to its
    end: the events the relay yields, and how many times it read the job's log."""
    request = GenerationRequest(model="m", prompt_token_ids=[1], max_tokens=2, temperature=0.0, top_p=1.0,
                                frequency_penalty=0.0, presence_penalty=0.0, seed=0)
    record = JobRecord.new(request, kind="interactive", owner="o", queue="q")
    reads = []
    status_and_log = store.status_and_log
    store.status_and_log = lambda *a, **k: reads.append(a) or status_and_log(*a, **k)
    relay = EventRelay(store, hub, record.id, after_seq=-1, keepalive_s=0.2, new_job=new_job)
    store.create(record)
    _, attempt = store.start(record.id, "w")
    usage = Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2)
    store.write(attempt, [JobEvent(type="delta", text="Hi")])
    store.write(attempt, [], Ending.completed(JobResult(text="Hi", finish_reason="stop", usage=usage)), acknowledged=1)
    if written is not None:
        written.set()
    try:
        events = [e for e in relay.events(deadline=time.monotonic() + 10) if e is not None]
    finally:
        relay.close()
    return [(e.seq, e.type) for e in events], len(reads)


def test_a_new_jobs_stream_reads_no_log_once_its_channel_is_subscribed(hub):
    """A relay for a job not recorded yet waits for its channel's subscription; the job, recorded after it,
    has every event coming live: reading its (empty) log first would be a wasted round trip per request."""
    assert _finished_job_events(hub.store, hub, new_job=True) == ([(0, "delta"), (1, "done")], 0)


def test_a_new_jobs_stream_replays_the_log_when_its_subscription_came_late(hub, monkeypatch):
    monkeypatch.setattr("app.relay.NEW_JOB_SUBSCRIBE_WAIT_S", 0.0)  # the job is recorded before it is confirmed
    connect = hub._connect
    written = threading.Event()  # the hub connects only once the job has run to its end
    monkeypatch.setattr(hub, "_connect", lambda: written.wait(10) and connect())
    events, reads = _finished_job_events(hub.store, hub, new_job=True, written=written)
    assert events == [(0, "delta"), (1, "done")] and reads >= 1


def test_one_subscription_per_job_channel_and_a_second_stream_of_a_job_resyncs_at_once(hub, redis_client):
    """Per channel, not by pattern: Redis writes a job's events only to the API processes that stream it."""
    a = hub.listen("job-a")
    assert next_item(a) is RESYNC
    assert redis_client.pubsub_numpat() == 0 or not any(
        c["name"] == hub.store.prefix and int(c.get("psub", 0)) for c in redis_client.client_list(_type="pubsub"))
    assert redis_client.pubsub_numsub(hub.store.keys.events("job-a"))[0][1] == 1
    again = hub.listen("job-a")
    assert next_item(again) is RESYNC  # already subscribed: it may replay the log now
    hub.unlisten("job-a", a)
    assert redis_client.pubsub_numsub(hub.store.keys.events("job-a"))[0][1] == 1  # one stream still reads it
    hub.unlisten("job-a", again)
    wait = time.monotonic() + 5
    while redis_client.pubsub_numsub(hub.store.keys.events("job-a"))[0][1] and time.monotonic() < wait:
        time.sleep(0.01)
    assert redis_client.pubsub_numsub(hub.store.keys.events("job-a"))[0][1] == 0
