"""The queue of batch line jobs: a plain kombu queue on the same Redis (not a Celery task queue).

Workers consume it with a fixed number of their own threads (`batch_slots`), beside the Celery threads that
take interactive requests, so a batch can never occupy all of a worker. Messages are acknowledged when the
job is done, and the Redis transport redelivers unacknowledged ones after the visibility timeout, as Celery
does for interactive jobs.
"""
from __future__ import annotations

from kombu import Connection

from jobs.redis_connection import broker_settings


def connect(settings) -> Connection:
    # The same broker URL and options as Celery's (a Sentinel set's, where REDIS_URL names one).
    url, options = broker_settings(settings.redis_url, {"visibility_timeout": settings.visibility_timeout_s})
    return Connection(url, transport_options=options)


def open_queue(connection: Connection, name: str):
    return connection.SimpleQueue(name, serializer="json")


class BatchQueueProducer:
    """Puts line jobs on batch queues (one connection, used from one thread: the dispatcher's or the
    reaper's). Each job goes to the queue in its record: its model's pool."""

    def __init__(self, settings):
        self._connection = connect(settings)
        self._queues: dict = {}

    def put(self, job_id: str, queue: str) -> None:
        if queue not in self._queues:
            self._queues[queue] = open_queue(self._connection, queue)
        self._queues[queue].put({"job_id": job_id})

    def __call__(self, record) -> None:
        self.put(record.id, record.queue)
