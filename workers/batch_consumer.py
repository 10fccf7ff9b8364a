"""Batch line jobs: a fixed number of threads per worker process take them from the batch queue.

These threads are separate from Celery's interactive ones, so however long the batch queue, a worker keeps
its Celery threads for interactive requests: batch work is capped at `batch_slots` jobs per worker.
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import Callable

from jobs.batch_queue import connect, open_queue

log = logging.getLogger(__name__)


class BatchConsumer:
    def __init__(self, settings, execute: Callable[[str], str]):
        self.settings = settings
        self.execute = execute
        self._stop = threading.Event()

    def start(self, slots: int) -> None:
        for index in range(slots):
            threading.Thread(target=self._consume, name=f"batch-{index}", daemon=True).start()
        log.info("taking batch jobs from queue %r with %d slot(s)", self.settings.batch_queue, slots)

    def stop(self) -> None:
        self._stop.set()

    def _consume(self) -> None:
        while not self._stop.is_set():
            try:
                with connect(self.settings) as connection:
                    jobs = open_queue(connection, self.settings.batch_queue)
                    while not self._stop.is_set():
                        try:
                            message = jobs.get(block=True, timeout=1)
                        except queue.Empty:
                            continue
                        self.execute(message.payload["job_id"])
                        message.ack()  # only now: a worker that dies mid-job leaves it to be redelivered
            except Exception:  # Redis away: reconnect after a pause
                log.exception("batch consumer: connection lost, retrying")
                self._stop.wait(2)
