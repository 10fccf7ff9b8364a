"""REDIS_URL -> the job store's redis-py client and Celery's (kombu's) broker URL, for a plain Redis or a
Redis Sentinel set.

A plain Redis is named as redis-py names it: `redis://[[user]:password@]host[:port][/db]`, `rediss://...`
(TLS) or `unix:///path/to/redis.sock?db=N`.

A Sentinel set is named by its Sentinels and the name they monitor the master under:

    redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/<master name>[/<db>][?sentinel_password=...]

e.g. `redis+sentinel://10.0.0.1:26379,10.0.0.2:26379,10.0.0.3:26379/llmq/0`. The port defaults to 26379 and
the db to 0; user and password are the Redis servers' (master and replicas), `sentinel_password` the
Sentinels' own, if they require one. (One string, because every process reads the one REDIS_URL setting.)

The job store's client then comes from redis-py's `Sentinel(...).master_for(master)`: each new connection
asks a Sentinel where the master is, so after a failover new connections go to the new one; a connection
still open to a demoted master gets READONLY on its next write, which redis-py turns into ConnectionError
(and drops the connection): the job store's "Redis away: retry" (`jobs.store.REDIS_DOWN`). The pub/sub
connections the API's relay opens come from the same pool, so they follow the master too.

The broker gets kombu's own Sentinel form, `sentinel://host1:26379/0;sentinel://host2:26379/0;...`, with the
master's name in its transport options (`master_name`; kombu/transport/redis.py, SentinelChannel).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional
from urllib.parse import parse_qs, quote, unquote, urlsplit

import redis
from redis.sentinel import Sentinel

SENTINEL_SCHEME = "redis+sentinel"
DEFAULT_SENTINEL_PORT = 26379

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
    unknown = set(query) - {"sentinel_password"}
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} in {url!r} (only sentinel_password)")
    sentinel_password = query["sentinel_password"][-1] if "sentinel_password" in query else None
    return SentinelURL(sentinels, master, int(db), username, password, sentinel_password)


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
