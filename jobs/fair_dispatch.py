"""The dispatcher: parked jobs (jobs/fair_queue.py) to their pool's Celery queue, round-robin across keys.

There is no dispatcher process. Any process may pump a queue, and several do, because `take` is one atomic
Lua move (no job is taken twice):
  * the API, right after it parks a request's job (an idle pool starts it at once, with no added wait; a job
    that arrives while nobody waits is taken as it is recorded instead: `offer`);
  * every worker, for its own pool, each time it starts or ends a job (the Celery list just lost a message,
    or a slot just freed) if that start or end saw jobs parked on the pool (Transition.parked; over several
    shards it cannot tell, and pumps), and on a short tick (workers that came up after jobs were parked).
So the dispatcher survives any crash: a process that dies between its move and the send leaves jobs marked
`sending`, which the lost-delivery reaper sends again (JobStore.reap_lost).

`margin` is how many messages the Celery list may hold. Workers reserve only what they run (prefetch 1 per
thread), so Celery holds at most the pool's live capacity plus `margin` jobs; the rest wait in their keys'
queues, where the rotation decides what goes next. `reserve`: how many of the pool's live slots (its live
workers' concurrency, from their heartbeats) one key's jobs in flight leave to the others while other keys
have been active within `active_s`, so that their next jobs start at once rather than when one of the flood's
jobs ends (a key alone on the pool uses every slot).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from jobs.fair_queue import FairQueue, TakeOffer

log = logging.getLogger(__name__)


@dataclass
class Pumped:
    """What one pump did: the jobs it sent, and those it took but could not send (the send failed, with
    `error`: each is left `sending`, for the lost-delivery reaper)."""
    sent: list[str] = field(default_factory=list)
    unsent: list[str] = field(default_factory=list)
    error: Optional[Exception] = None


class LiveSlots:
    """`slots(queue)`: the jobs a pool's live workers run at once (their heartbeats' concurrency, added up),
    read at most once a second (every pump asks)."""

    def __init__(self, store, cache_s: float = 1.0):
        self.store = store
        self.cache_s = cache_s
        self._read_at = -float("inf")
        self._slots: dict[str, int] = {}

    def __call__(self, queue: str) -> int:
        if time.monotonic() - self._read_at >= self.cache_s:
            slots: dict[str, int] = {}
            for beat in self.store.live_workers():
                name = beat.get("queue")
                slots[name] = slots.get(name, 0) + int(beat.get("concurrency") or 0)
            self._slots, self._read_at = slots, time.monotonic()
        return self._slots.get(queue, 0)


class FairDispatcher:
    def __init__(self, fair: FairQueue, send: Callable[[str, str], None], margin: int, reserve: int = 0,
                 capacity: Optional[Callable[[str], int]] = None, flight_s: Optional[float] = None,
                 active_s: float = 60.0):
        """`send(job_id, queue)` puts the job's message on that Celery queue (Celery's send_task);
        `capacity(queue)` is the pool's live slots (LiveSlots); `flight_s` how long a job may count against
        its key's share (the job deadline: it has ended by then)."""
        self.fair = fair
        self.send = send
        self.margin = margin
        self.reserve = reserve
        self.capacity = capacity
        self.flight_s = flight_s
        self.active_s = active_s

    def key_cap(self, queue: str) -> int:
        """Most jobs in flight per key: the live slots but the reserve (at least 1); no cap (0) while the pool
        has no live worker (then only the margin bounds what goes to Celery)."""
        slots = self.capacity(queue) if self.capacity is not None else 0
        return max(1, slots - self.reserve) if slots > 0 else 0

    def offer(self, queue: str) -> TakeOffer:
        """This pool's rules of a take, now: what `pump` takes by, and what a new job needs to be taken as it is
        recorded when nobody waits on the pool (JobStore.create; then the caller sends it with `send_taken`)."""
        now = time.time()
        return TakeOffer(room=self.margin, key_cap=self.key_cap(queue), active_since=now - self.active_s,
                         stale_before=now - self.flight_s if self.flight_s else None)

    def pump(self, queue: str) -> Pumped:
        """Fill the queue's room with parked jobs. A send that fails stops this pump (the broker is likely
        away): that job and the rest taken stay `sending`. Raises only if Redis is away for the take."""
        rules = self.offer(queue)
        taken = self.fair.take(queue, rules.room, rules.key_cap, rules.stale_before, self.active_s)
        return self.send_taken(queue, taken)

    def send_taken(self, queue: str, taken: list[str]) -> Pumped:
        """Send jobs taken for this queue (by a take, or as they were recorded), then confirm the sends."""
        pumped = Pumped()
        for index, job_id in enumerate(taken):
            try:
                self.send(job_id, queue)
            except Exception as exc:
                log.warning("fair dispatch to %s: send failed (%s); %d job(s) left for the lost-delivery reaper",
                            queue, type(exc).__name__, len(taken) - index)
                pumped.unsent, pumped.error = taken[index:], exc
                break
            pumped.sent.append(job_id)
        if pumped.sent:
            try:
                self.fair.confirm_sent(pumped.sent)
            except Exception as exc:  # they were sent: at worst the reaper sends one again (fenced at start)
                log.warning("fair dispatch to %s: confirming %d sends failed: %s", queue, len(pumped.sent), exc)
        return pumped


class PumpThread:
    """A worker's pump for its pool: woken when a slot frees or a message leaves the Celery list, and every
    `tick_s` in any case. Errors (Redis away) are logged and the next wake-up tries again."""

    def __init__(self, dispatcher: FairDispatcher, queue: str, tick_s: float):
        self.dispatcher = dispatcher
        self.queue = queue
        self.tick_s = tick_s
        self._wanted = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fair-dispatch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wanted.set()

    def stop(self) -> None:
        self._stop.set()
        self._wanted.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wanted.wait(self.tick_s)
            self._wanted.clear()
            if self._stop.is_set():
                return
            try:
                self.dispatcher.pump(self.queue)
            except Exception as exc:
                log.warning("fair dispatch to %s failed: %s", self.queue, exc)
