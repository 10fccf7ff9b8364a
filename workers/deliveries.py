"""Which jobs' messages this worker holds and has not started: recorded on the job only when it matters.

A worker that dies holding a message (received, not started) keeps that message in Celery's unacked set until
the visibility timeout, an hour; a delivery on record (JobStore.mark_delivered: the job's `delivered_to`) lets a
reaper see the holder is dead and send the job again at once. But a message arrives only when one of the
worker's threads is free (prefetch 1 per thread), so nearly every job starts within milliseconds of its
message, and its start says who holds it. Recording every delivery at once costs every job a round trip for
that rare case; so a delivery is recorded only if its job has not started `grace_s` after the message came.
A worker that dies inside that window leaves its job to the reaper's other rule (the job's queue is empty):
later, under a busy queue, but not lost.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

log = logging.getLogger(__name__)


class DeliveryRecorder:
    def __init__(self, mark_delivered: Callable[[str], None], grace_s: float = 0.1):
        """`mark_delivered(job_id)`: the record (JobStore.mark_delivered with this worker's name)."""
        self.mark_delivered = mark_delivered
        self.grace_s = grace_s
        self._waiting: dict[str, float] = {}  # job id -> when its message came (insertion order: oldest first)
        self._changed = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="deliveries", daemon=True)
        self._thread.start()

    def received(self, job_id: str) -> None:
        with self._changed:
            self._waiting.setdefault(job_id, time.monotonic())
            self._changed.notify()

    def started(self, job_id: str) -> None:
        """Its attempt is starting (or it was skipped): its start, not a delivery record, says who has it."""
        with self._changed:
            self._waiting.pop(job_id, None)

    def stop(self) -> None:
        with self._changed:
            self._stop = True
            self._changed.notify()

    def _due(self) -> tuple[list[str], Optional[float]]:
        """The jobs whose grace is over (removed), and how long until the next one's is (None: none waits)."""
        now, due = time.monotonic(), []
        for job_id, since in list(self._waiting.items()):
            if now - since < self.grace_s:
                return due, self.grace_s - (now - since)
            due.append(job_id)
            del self._waiting[job_id]
        return due, None

    def _run(self) -> None:
        while True:
            with self._changed:
                due, wait_s = self._due()
                if not due:
                    if self._stop:
                        return
                    self._changed.wait(wait_s)
                    continue
            for job_id in due:
                try:
                    self.mark_delivered(job_id)
                except Exception as exc:  # Redis away: the job is still watched (the reaper's empty-queue rule)
                    log.warning("job %s: delivery not recorded: %s", job_id, exc)
