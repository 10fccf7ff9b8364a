"""REDIS_URL -> the job store's redis-py client and Celery's (kombu's) broker URL, for a plain Redis or a
Redis Sentinel set.

A plain Redis is named as redis-py names it: `redis://[[user]:password@]host[:port][/db]`, `rediss://...`
(TLS) or `unix:///path/to/redis.sock?db=N`.

A Sentinel set is named by its Sentinels and the name they monitor the master under:

    redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/<master name>[/<db>][?sentinel_password=...]
                                                                                  [&replica_wait_ms=500]

e.g. `redis+sentinel://10.0.0.1:26379,10.0.0.2:26379,10.0.0.3:26379/llmq/0`. The port defaults to 26379 and
the db to 0; user and password are the Redis servers' (master and replicas), `sentinel_password` the
Sentinels' own, if they require one; `replica_wait_ms` how long a new job's record may wait for a replica to
confirm it (`ReplicaWait`; 0: not at all). (One string, because every process reads the one REDIS_URL setting.)

The job store's client then comes from redis-py's `Sentinel(...).master_for(master)`: each new connection
asks a Sentinel where the master is, so after a failover new connections go to the new one; a connection
still open to a demoted master gets READONLY on its next write, which redis-py turns into ConnectionError
(and drops the connection): the job store's "Redis away: retry" (`jobs.store.REDIS_DOWN`). The pub/sub
connections the API's relay opens come from the same pool, so they follow the master too.

Replication is asynchronous: a master that dies takes with it what it had not yet sent its replica, and
the replica promoted in its place never had it. For a job's events and its end the workers repair that (an
attempt whose log lacks events it was told were logged stops with Outcome.GAP, or loses its lease; a new
attempt resumes from the log, and a lost end is generated again), provided no client saw what was lost: a
lost *record* is a job the client was given and that no longer exists, and a lost event a client saw cannot
be matched with the regenerated ones (an event carries the tokens of one publisher cycle). So a record is
confirmed by a replica before the API gives out its id (JobStore.create), and events before the API's relay
shows them (JobStore.settle, app/relay.py): `ReplicaWait`.

The broker gets kombu's own Sentinel form, `sentinel://host1:26379/0;sentinel://host2:26379/0;...`, with the
master's name in its transport options (`master_name`; kombu/transport/redis.py, SentinelChannel).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Optional
from urllib.parse import parse_qs, quote, unquote, urlsplit

import redis
from redis.sentinel import Sentinel

log = logging.getLogger(__name__)

SENTINEL_SCHEME = "redis+sentinel"
DEFAULT_SENTINEL_PORT = 26379
# How long a new job's record waits for a replica's confirmation (WAIT), unless the URL says
# (`replica_wait_ms`). On one machine a confirmation adds about 0.16 ms to a create (0.24 -> 0.40 ms, p50); a
# replica that has not confirmed in half a second is stalled, or cut off from its master.
DEFAULT_REPLICA_WAIT_MS = 500

# The job store's connections (what JobStore.from_settings has always used): keep-alive and a health check on
# idle connections, so a dead peer is noticed; bounded waits, so an outage raises (and is retried) instead of
# hanging a request or the publisher.
STORE_OPTIONS = dict(decode_responses=True, health_check_interval=30, socket_keepalive=True,
                     socket_connect_timeout=3, socket_timeout=15, retry_on_timeout=True)

# Asking a Sentinel where the master is: short timeouts, so an unreachable Sentinel costs a second before the
# next one is asked, not the 15 s a slow Redis command may take.
SENTINEL_QUERY_OPTIONS = dict(socket_connect_timeout=1, socket_timeout=1, socket_keepalive=True)


@dataclass(frozen=True)
class SentinelURL:
    """What a `redis+sentinel://` URL names."""
    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: Optional[str] = None
    password: Optional[str] = None
    sentinel_password: Optional[str] = field(default=None, repr=False)
    replica_wait_ms: int = DEFAULT_REPLICA_WAIT_MS


def is_sentinel_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() == SENTINEL_SCHEME


def parse_sentinel_url(url: str) -> SentinelURL:
    """Parse a `redis+sentinel://` URL (module docstring); ValueError says what is wrong with it."""
    parts = urlsplit(url)
    if parts.scheme.lower() != SENTINEL_SCHEME:
        raise ValueError(f"not a {SENTINEL_SCHEME}:// URL: {url!r}")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, has_password, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if has_password else None
    sentinels = tuple(_host_port(item, url) for item in hosts.split(","))
    path = [unquote(p) for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise ValueError(f"a Sentinel URL's path is /<master name>[/<db>]: {url!r}")
    master, db = path[0], path[1] if len(path) == 2 else "0"
    if not db.isdigit():
        raise ValueError(f"the db must be a number, not {db!r}: {url!r}")
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = set(query) - {"sentinel_password", "replica_wait_ms"}
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} in {url!r} (only sentinel_password, "
                         f"replica_wait_ms)")
    sentinel_password = query["sentinel_password"][-1] if "sentinel_password" in query else None
    wait = query.get("replica_wait_ms", [str(DEFAULT_REPLICA_WAIT_MS)])[-1]
    if not wait.isdigit():
        raise ValueError(f"replica_wait_ms must be a whole number of milliseconds, not {wait!r}: {url!r}")
    return SentinelURL(sentinels, master, int(db), username, password, sentinel_password, int(wait))


def _host_port(item: str, url: str) -> tuple[str, int]:
    item = item.strip()
    if item.startswith("["):  # IPv6: [::1]:26379
        host, _, rest = item[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = item.partition(":")
    if not host or (port and not port.isdigit()):
        raise ValueError(f"bad Sentinel address {item!r} in {url!r}")
    return host, int(port) if port else DEFAULT_SENTINEL_PORT


def redis_client(url: str, **options) -> redis.Redis:
    """The job store's client for REDIS_URL: plain Redis or a Sentinel set's master (module docstring).
    `options` override STORE_OPTIONS (the connections' settings)."""
    options = {**STORE_OPTIONS, **options}
    if not is_sentinel_url(url):
        return redis.Redis.from_url(url, **options)
    target = parse_sentinel_url(url)
    sentinel_kwargs = dict(SENTINEL_QUERY_OPTIONS)
    if target.sentinel_password is not None:
        sentinel_kwargs["password"] = target.sentinel_password
    sentinel = Sentinel(list(target.sentinels), sentinel_kwargs=sentinel_kwargs)
    credentials = {k: v for k, v in (("username", target.username), ("password", target.password)) if v}
    return sentinel.master_for(target.master, db=target.db, **credentials, **options)


def broker_settings(url: str, transport_options: dict) -> tuple[str, dict]:
    """Celery's broker URL and transport options for REDIS_URL: unchanged for a plain Redis; for a Sentinel
    set, kombu's `sentinel://...;sentinel://...` form and its master's name, added to `transport_options`."""
    if not is_sentinel_url(url):
        return url, dict(transport_options)
    target = parse_sentinel_url(url)
    userinfo = ""
    if target.username or target.password:
        userinfo = quote(target.username or "", safe="")
        if target.password is not None:
            userinfo += ":" + quote(target.password, safe="")
        userinfo += "@"
    # kombu takes the credentials and db from the first address, the other addresses only for their host.
    broker_url = ";".join(f"sentinel://{userinfo}{_netloc(host, port)}/{target.db}"
                          for host, port in target.sentinels)
    options = {**transport_options, "master_name": target.master}
    sentinel_kwargs = dict(SENTINEL_QUERY_OPTIONS)
    if target.sentinel_password is not None:
        sentinel_kwargs["password"] = target.sentinel_password
    options.setdefault("sentinel_kwargs", sentinel_kwargs)
    return broker_url, options


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- a new job's record, confirmed by a replica

class NotReplicated(redis.ConnectionError):
    """The master took a write that no replica has confirmed, and a failover could lose it (a replica is
    connected but lagging, or the Sentinels name another master by now). A ConnectionError: what the job store
    treats as "Redis away" (jobs.store.REDIS_DOWN), so the API answers 503 and the client retries."""


class ReplicaWait:
    """Confirms that a new job's record is on a replica before the client is told about it (JobStore.create);
    `settle` does the same for everything the master took so far (a job's events, before a client sees them).

    `confirm(client, key, ttl_s)`: on one connection of the master client's pool, PEXPIRE `key` (the record
    just written: its TTL again, a write Redis propagates), ROLE and `WAIT 1 <timeout_ms>`, in one round trip.
    WAIT counts the replicas that have this connection's writes so far, and the replication stream is one
    ordered stream: a replica that has the PEXPIRE has the record, written before it on another connection.
    Then:
      - PEXPIRE found no key: this master does not have the record (a failover came in between): NotReplicated;
      - a replica confirmed: the record survives a failover (the Sentinels promote the replica with the most
        data; with one replica, the one that confirmed);
      - no confirmation and a replica online (ROLE): it lags, or stalls: NotReplicated (the client retries),
        not a promise that a failover now would break;
      - no replica online: either the set lost a node (after a failover, until the old master is back as a
        replica, or for good), or the master is cut off from its replica, which the Sentinels may be about to
        promote without what the master takes now (a partition: Redis's split brain). The two look the same
        from here, so for `alone_after_s` from the first time this process saw no replica online it refuses
        (NotReplicated), and later accepts on the master alone (as durable as one Redis: its AOF). That delay
        is ten times the Sentinels' down-after-milliseconds (as they report it): what they take to promote a
        replica, with a wide margin; and the Sentinels do not promote a replica cut off for much longer than
        that. Refused at any time if the Sentinels name another master than the one that took the record (a
        failover done, or a planned one under way). While no replica is online, confirms skip the WAIT (it
        would only time out) until ROLE shows one again.
    """

    def __init__(self, timeout_ms: int = DEFAULT_REPLICA_WAIT_MS, replicas: int = 1,
                 alone_after_s: Optional[float] = None):
        self.timeout_ms = timeout_ms
        self.replicas = replicas
        self._alone_after_s = alone_after_s  # None: from the Sentinels' down-after, when first needed
        self.alone_since: Optional[float] = None  # when this process first saw no replica online (monotonic)
        self.alone_on: Optional[tuple] = None     # on which master

    def confirm(self, client: redis.Redis, key: str, ttl_s: int) -> int:
        """How many replicas confirmed the write of `key` (0: accepted on the master alone); NotReplicated if
        the promise cannot be made (class docstring). Redis errors propagate (jobs.store.REDIS_DOWN)."""
        return self._check(client, ("PEXPIRE", key, int(ttl_s * 1000)), key)

    def settle(self, client: redis.Redis, channel: str) -> int:
        """The same promise for everything the master has taken so far, whoever wrote it (a job's events, before
        a client is shown them): the write that WAIT follows is a PUBLISH on `channel` (propagated to replicas
        like any write, and no key), then the same rules."""
        return self._check(client, ("PUBLISH", channel, ""), None)

    def _check(self, client: redis.Redis, write: tuple, key: Optional[str]) -> int:
        pool = client.connection_pool
        conn = _connection(pool)
        what = key or "what it took"
        read_all = False
        try:
            commands = [write, ("ROLE",)]
            if self.alone_since is None:
                commands.append(("WAIT", self.replicas, self.timeout_ms))
            conn.send_packed_command(conn.pack_commands(commands))
            replies = [conn.read_response() for _ in commands]
            read_all = True
            if key is not None and not int(replies[0]):
                raise NotReplicated(f"the record {key} is not on the master any more (a failover)")
            role = replies[1]
            online = len(role[2]) if role[0] in ("master", b"master") else 0
            acked = int(replies[2]) if len(replies) > 2 else 0
            if acked < self.replicas and online and self.alone_since is not None:  # one is back: wait for it
                read_all = False
                conn.send_command("WAIT", self.replicas, self.timeout_ms)
                acked = int(conn.read_response())
                read_all = True
            if acked >= self.replicas:
                if self.alone_since is not None:
                    log.warning("Redis master %s:%s has a replica again: what clients are told waits for its "
                                "confirmation", conn.host, conn.port)
                self.alone_since = None
                return acked
            if online:
                raise NotReplicated(f"no replica confirmed {what} within {self.timeout_ms} ms ({online} online)")
            master = pool.get_master_address() if hasattr(pool, "get_master_address") else None
            if master is not None and (conn.host, int(conn.port)) != (master[0], int(master[1])):
                raise NotReplicated(f"the Sentinels name {master[0]}:{master[1]} the master, not "
                                    f"{conn.host}:{conn.port}, which took {what}")
            now = time.monotonic()
            if self.alone_since is None or self.alone_on != (conn.host, conn.port):
                self.alone_since, self.alone_on = now, (conn.host, conn.port)
                log.warning("Redis master %s:%s has no replica online: new jobs are refused (and events held) for "
                            "%.0f s (a replica cut off from it could be promoted without them), then accepted on "
                            "it alone", conn.host, conn.port, self.alone_after_s(pool))
            alone_for = now - self.alone_since
            if alone_for < self.alone_after_s(pool):
                raise NotReplicated(f"no replica online for {alone_for:.1f} s of the "
                                    f"{self.alone_after_s(pool):.0f} s before the master is trusted alone")
            return 0
        except BaseException:
            if not read_all:
                conn.disconnect()  # replies may be left unread on it
            raise
        finally:
            pool.release(conn)

    def alone_after_s(self, pool) -> float:
        if self._alone_after_s is None:
            down_after_s = _down_after_s(pool)
            if down_after_s is None:
                return 10 * 30.0  # the Sentinels' default down-after; ask again next time
            self._alone_after_s = 10 * down_after_s
        return self._alone_after_s


def _down_after_s(pool) -> Optional[float]:
    """The Sentinels' down-after-milliseconds for the pool's master (the first that answers), in seconds."""
    manager, name = getattr(pool, "sentinel_manager", None), getattr(pool, "service_name", None)
    for sentinel in getattr(manager, "sentinels", ()):
        try:
            return int(sentinel.sentinel_master(name)["down-after-milliseconds"]) / 1000
        except (redis.RedisError, KeyError, TypeError, ValueError):
            continue
    return None


def replica_wait(url: str) -> Optional[ReplicaWait]:
    """The ReplicaWait for REDIS_URL: None for a plain Redis (no replica to wait for), or a Sentinel URL with
    replica_wait_ms=0."""
    if not is_sentinel_url(url):
        return None
    timeout_ms = parse_sentinel_url(url).replica_wait_ms
    return ReplicaWait(timeout_ms) if timeout_ms > 0 else None


def _connection(pool):
    try:
        return pool.get_connection()
    except TypeError:  # redis-py < 5.3 wants a command name
        return pool.get_connection("WAIT")
