"""REDIS_URL -> the job store's client and Celery's broker settings (jobs/redis_connection.py): plain URLs as
redis-py reads them, Sentinel URLs into redis-py's Sentinel master client and kombu's sentinel:// form."""
from __future__ import annotations

import pytest
import redis
from redis.sentinel import SentinelConnectionPool

from config.settings import Settings
from jobs.celery_app import make_celery
from jobs.redis_connection import (STORE_OPTIONS, SentinelURL, broker_settings, is_sentinel_url,
                                   parse_sentinel_url, redis_client)

THREE = "redis+sentinel://10.0.0.1:26379,10.0.0.2:26380,sentinel-c/llmq/3"


def test_parses_sentinels_master_and_db():
    assert parse_sentinel_url(THREE) == SentinelURL(
        sentinels=(("10.0.0.1", 26379), ("10.0.0.2", 26380), ("sentinel-c", 26379)), master="llmq", db=3)


def test_db_defaults_to_0_and_credentials_and_sentinel_password_are_read():
    target = parse_sentinel_url("redis+sentinel://app:p%40ss@[::1]:26379/mymaster?sentinel_password=s3")
    assert target.sentinels == (("::1", 26379),)
    assert (target.master, target.db, target.username, target.password) == ("mymaster", 0, "app", "p@ss")
    assert target.sentinel_password == "s3"
    assert parse_sentinel_url("redis+sentinel://:secret@h/m").password == "secret"
    assert parse_sentinel_url("redis+sentinel://:secret@h/m").username is None


@pytest.mark.parametrize("url", [
    "redis+sentinel://h1:26379",               # no master name
    "redis+sentinel://h1:26379/m/x",           # db not a number
    "redis+sentinel://h1:26379/m/0/extra",     # too long a path
    "redis+sentinel://h1:port/m",              # port not a number
    "redis+sentinel://h1,,h2/m",               # an empty address
    "redis+sentinel://h1/m?master_name=other",  # an option that does nothing
    "redis://h1:6379/0",                       # not a Sentinel URL
])
def test_bad_urls_are_refused_with_a_reason(url):
    with pytest.raises(ValueError):
        parse_sentinel_url(url)


def test_only_the_sentinel_scheme_is_a_sentinel_url():
    assert is_sentinel_url(THREE) and is_sentinel_url("REDIS+SENTINEL://h/m")
    assert not any(map(is_sentinel_url, ["redis://h:6379/0", "rediss://h/0", "unix:///tmp/r.sock?db=2",
                                         "sentinel://h:26379"]))


def test_a_plain_url_gives_the_store_its_usual_client():
    client = redis_client("redis://127.0.0.1:6399/5")
    kwargs = client.connection_pool.connection_kwargs
    assert not isinstance(client.connection_pool, SentinelConnectionPool)
    assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("127.0.0.1", 6399, 5)
    assert {k: kwargs[k] for k in STORE_OPTIONS if k in kwargs} == \
        {k: v for k, v in STORE_OPTIONS.items() if k in kwargs}
    assert client.get_encoder().decode_responses
    assert redis_client("unix:///tmp/redis.sock?db=2").connection_pool.connection_kwargs["path"] == "/tmp/redis.sock"


def test_a_sentinel_url_gives_a_master_client_that_asks_the_sentinels():
    client = redis_client("redis+sentinel://u:pw@10.0.0.1:26379,10.0.0.2/llmq/3?sentinel_password=sp")
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool) and pool.is_master and pool.service_name == "llmq"
    kwargs = pool.connection_kwargs
    assert (kwargs["db"], kwargs["username"], kwargs["password"]) == (3, "u", "pw")
    assert kwargs["socket_timeout"] == STORE_OPTIONS["socket_timeout"] and client.get_encoder().decode_responses
    sentinels = pool.sentinel_manager.sentinels
    assert [(s.connection_pool.connection_kwargs["host"], s.connection_pool.connection_kwargs["port"])
            for s in sentinels] == [("10.0.0.1", 26379), ("10.0.0.2", 26379)]
    assert sentinels[0].connection_pool.connection_kwargs["password"] == "sp"
    assert sentinels[0].connection_pool.connection_kwargs["socket_timeout"] == 1  # a dead Sentinel costs 1 s


def test_with_no_sentinel_reachable_the_client_raises_what_the_store_retries():
    from jobs.store import REDIS_DOWN
    client = redis_client("redis+sentinel://127.0.0.1:1/llmq/0")
    with pytest.raises(REDIS_DOWN):
        client.ping()


def test_broker_settings_plain_url_unchanged():
    assert broker_settings("redis://h:6379/2", {"visibility_timeout": 60}) == \
        ("redis://h:6379/2", {"visibility_timeout": 60})


def test_broker_settings_sentinel_url_is_kombus_form_with_the_master_name():
    url, options = broker_settings("redis+sentinel://u:p%3Aw@h1:26379,h2:26380/llmq/4", {"visibility_timeout": 60})
    assert url == "sentinel://u:p%3Aw@h1:26379/4;sentinel://u:p%3Aw@h2:26380/4"
    assert options["master_name"] == "llmq" and options["visibility_timeout"] == 60
    assert options["sentinel_kwargs"]["socket_timeout"] == 1


def test_kombu_reads_the_broker_settings_as_meant():
    """kombu's own parsing of what broker_settings gives: its Sentinel transport, the db, the credentials and
    every Sentinel address."""
    from kombu import Connection
    url, options = broker_settings("redis+sentinel://u:pw@h1:26379,h2:26380/llmq/4", {})
    connection = Connection(url, transport_options=options)
    assert connection.transport_cls == "sentinel" and connection.virtual_host == "4"
    assert (connection.userid, connection.password) == ("u", "pw")
    assert connection.alt == ["sentinel://u:pw@h1:26379/4", "sentinel://u:pw@h2:26380/4"]


def test_celery_app_uses_the_sentinel_broker_and_keeps_its_transport_options():
    app = make_celery(Settings(redis_url="redis+sentinel://h1:26379,h2:26379/llmq/1", visibility_timeout_s=77))
    assert app.conf.broker_url.startswith("sentinel://h1:26379/1;sentinel://h2:26379/1")
    assert app.conf.broker_transport_options["master_name"] == "llmq"
    assert app.conf.broker_transport_options["visibility_timeout"] == 77
    plain = make_celery(Settings(redis_url="redis://h:6379/1", visibility_timeout_s=77))
    assert plain.conf.broker_url == "redis://h:6379/1"
    assert plain.conf.broker_transport_options == {"visibility_timeout": 77}


# --- ReplicaWait: a new job's record (and events, `settle`) confirmed by a replica before a client is told

def test_replica_wait_ms_is_read_from_the_url_and_only_a_sentinel_set_waits():
    from jobs.redis_connection import DEFAULT_REPLICA_WAIT_MS, replica_wait
    assert parse_sentinel_url("redis+sentinel://h/m").replica_wait_ms == DEFAULT_REPLICA_WAIT_MS
    assert parse_sentinel_url("redis+sentinel://h/m?replica_wait_ms=250").replica_wait_ms == 250
    assert replica_wait("redis+sentinel://h/m?replica_wait_ms=250").timeout_ms == 250
    assert replica_wait("redis+sentinel://h/m?replica_wait_ms=0") is None  # asynchronous, as Redis gives it
    assert replica_wait("redis://h:6379/0") is None                        # a plain Redis has no replica
    with pytest.raises(ValueError):
        parse_sentinel_url("redis+sentinel://h/m?replica_wait_ms=soon")


def test_the_store_of_a_sentinel_set_waits_and_a_plain_one_does_not():
    from jobs.store import JobStore
    sentinel = JobStore.from_settings(Settings(redis_url="redis+sentinel://h1:26379/llmq/1?replica_wait_ms=300"))
    assert sentinel.replica_wait is not None and sentinel.replica_wait.timeout_ms == 300
    assert JobStore.from_settings(Settings(redis_url="redis://h:6379/1")).replica_wait is None


@pytest.fixture
def lone_redis():
    """The test Redis (a master with no replica), on a db of its own for these keys."""
    from tests.conftest import REDIS_URL
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.skip(f"no Redis at {REDIS_URL}")
    yield client
    client.delete("replica-wait-test:job:1")
    client.close()


def test_a_master_alone_refuses_for_its_delay_then_accepts_and_skips_the_wait(lone_redis):
    import time
    from jobs.redis_connection import NotReplicated, ReplicaWait
    from jobs.store import REDIS_DOWN
    lone_redis.set("replica-wait-test:job:1", "x", ex=60)
    wait = ReplicaWait(timeout_ms=50, alone_after_s=0.3)
    started = time.monotonic()
    with pytest.raises(NotReplicated) as refused:  # alone: a replica cut off just now could be promoted
        wait.confirm(lone_redis, "replica-wait-test:job:1", 3600)
    assert isinstance(refused.value, REDIS_DOWN)  # what the API answers 503 for
    assert time.monotonic() - started >= 0.05     # it did WAIT, the first time
    assert wait.alone_since is not None
    started = time.monotonic()
    with pytest.raises(NotReplicated):
        wait.settle(lone_redis, "replica-wait-test:replicated")
    assert time.monotonic() - started < 0.05      # alone: no WAIT any more
    time.sleep(0.3)
    assert wait.confirm(lone_redis, "replica-wait-test:job:1", 3600) == 0  # trusted alone now
    assert wait.settle(lone_redis, "replica-wait-test:replicated") == 0
    assert lone_redis.ttl("replica-wait-test:job:1") > 60  # the PEXPIRE that WAIT follows: the record's TTL


def test_a_record_missing_from_the_master_is_never_confirmed(lone_redis):
    from jobs.redis_connection import NotReplicated, ReplicaWait
    wait = ReplicaWait(timeout_ms=50, alone_after_s=0)
    with pytest.raises(NotReplicated, match="not on the master"):  # a failover came between create and confirm
        wait.confirm(lone_redis, "replica-wait-test:job:absent", 3600)


def test_a_create_no_replica_confirmed_is_withdrawn_and_raises_what_the_api_answers_503_for(make_store):
    """JobStore.create on a Sentinel set: NotReplicated ends the job (it must not run behind the client's back:
    the client is told 503 and retries) and propagates."""
    from jobs.records import JobRecord, JobStatus
    from jobs.redis_connection import NotReplicated
    from tests.unit.conftest import REQUEST

    class Refusing:
        def confirm(self, client, key, ttl_s):
            assert client.exists(key)  # asked after the record is written
            raise NotReplicated("no replica confirmed it")

    store = make_store(lease_s=5)
    store.replica_wait = Refusing()
    record = JobRecord.new(REQUEST, kind="background", owner="o", queue=f"{store.prefix}-q")
    with pytest.raises(NotReplicated):
        store.create(record, parked=True)
    withdrawn = store.get(record.id)
    assert withdrawn.status is JobStatus.FAILED and withdrawn.error.code == "queue_unavailable"


def test_a_sentinel_broker_channel_closing_after_its_connection_raises_a_connection_error():
    """kombu 5.7's Sentinel channel, closed after its connection (a failover's reconnect), rebuilt its pool from
    the gone connection's parameters: an AttributeError that Celery calls unrecoverable (the worker exited).
    Ours says what it is, a connection error, which Celery's reconnect ignores."""
    import redis
    from jobs.sentinel_broker import TRANSPORT, FailoverSafeSentinelChannel

    assert make_celery(Settings(redis_url="redis+sentinel://h1:26379/llmq/0")).conf.broker_transport == TRANSPORT
    assert not make_celery(Settings(redis_url="redis://h:6379/0")).conf.broker_transport
    channel = FailoverSafeSentinelChannel.__new__(FailoverSafeSentinelChannel)  # as close() finds it: no client
    channel.connection = type("GoneConnection", (), {"client": None})()
    with pytest.raises(redis.ConnectionError):
        channel._connparams()
