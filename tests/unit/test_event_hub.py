"""The API's event hub on a real Redis: one pattern subscription delivers each job's events to that job's
listeners only, and after its connection drops it reconnects and tells every listener to resync."""
from __future__ import annotations

import queue
import uuid

import pytest
import redis

from app.relay import RESYNC, EventHub
from jobs.store import JobStore
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
