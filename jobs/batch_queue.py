"""The queue of batch line jobs: a plain kombu queue on the same Redis (not a Celery task queue).

Workers consume it with a fixed number of their own threads (`batch_slots`), beside the Celery threads that
take interactive requests, so a batch can never occupy all of a worker. Messages are acknowledged when the
job is done, and the Redis transport redelivers unacknowledged ones after the visibility timeout, as Celery
does for interactive jobs.
"""
from __future__ import annotations

from kombu import Connection


def connect(settings) -> Connection:
    return Connection(settings.redis_url,
                      transport_options={"visibility_timeout": settings.visibility_timeout_s})


def open_queue(connection: Connection, settings):
    return connection.SimpleQueue(settings.batch_queue, serializer="json")


class BatchQueueProducer:
    """Puts line jobs on the batch queue (one connection; used from the one dispatcher thread)."""

    def __init__(self, settings):
        self._connection = connect(settings)
        self._queue = open_queue(self._connection, settings)

    def __call__(self, record) -> None:
        self._queue.put({"job_id": record.id})
