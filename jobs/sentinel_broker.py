"""Celery's broker transport for a Redis Sentinel set: kombu's, with one fix, so that a worker rides out a failover.

When the master dies, Celery's consumer closes its broker connection and reconnects. Closing a kombu 5.7
Sentinel channel restores its unacked messages, which asks the channel for a fresh connection pool, which it
builds from the connection's parameters: by then the connection is gone (`self.connection.client` is None), and
the AttributeError that follows is no connection error, so Celery calls it unrecoverable and the worker
process exits (its supervisor starts a new one, which on a GPU means loading the model again). Here that case
is a connection error, which Celery's reconnect ignores as it ignores any other error of a dead connection:
the consumer reconnects to the new master. The unacked messages it could not restore then are restored later
by kombu (visibility timeout), and each job's own state is in the job store anyway (its reapers).

Named in Celery's settings as `broker_transport` (jobs/celery_app.py) when REDIS_URL is a Sentinel set.
"""
from __future__ import annotations

import redis
from kombu.transport.redis import SentinelChannel, SentinelTransport


class FailoverSafeSentinelChannel(SentinelChannel):
    def _connparams(self, asynchronous=False):
        if getattr(self.connection, "client", None) is None:  # closed meanwhile (a failover's reconnect)
            raise redis.ConnectionError("the broker connection is closed")
        return super()._connparams(asynchronous)


class FailoverSafeSentinelTransport(SentinelTransport):
    Channel = FailoverSafeSentinelChannel


TRANSPORT = f"{__name__}:{FailoverSafeSentinelTransport.__name__}"
