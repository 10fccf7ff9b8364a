"""The live relay: every job's events, from Redis to the streams this API process serves.

`EventHub`: one pub/sub connection per API process and Redis node, subscribed to every job's channel there by
pattern. It hands each message to the streams of that job open here and drops the rest. One connection instead
of one per stream: no subscribe round trip per request, and one socket read carries many streams' events.
`ShardedEventHub`: one EventHub per shard (jobs/shards.py), each stream listening on its job's.

`EventRelay`: one stream's view: the job's events with seq > after_seq, in order, exactly once. It first
replays the job's event log (a Redis Stream), then takes live events from the hub, skipping any it has
already yielded. Its listener is registered before the log is read, so nothing falls in between. A relay for
a job that does not exist yet (`new_job`: the API listens before it records the job) skips that first read
when the hub is subscribed as it listens: every event of the job is published after that, so all come live.

When the hub's connection drops (a Redis restart), events published meanwhile are missed. So after every
(re)connect the hub tells every listener to resync, and each relay replays the log from the last event it
yielded. Meanwhile the client's stream stays open with keep-alives. After `reconnect_s` without Redis, the
relay gives up (StreamInterrupted), and the client can resume later with Last-Event-ID.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Iterator, Optional

from jobs.records import JobEvent
from jobs.shards import ShardedJobStore
from jobs.store import REDIS_DOWN, JobStore

log = logging.getLogger(__name__)

RESYNC = object()  # put in every listener's queue after the hub (re)subscribed: replay the log


class StreamInterrupted(Exception):
    """Redis stayed away longer than the relay waits for it."""


class EventHub:
    def __init__(self, store: JobStore, retry_pause_s: float = 0.5):
        self.store = store
        self.retry_pause_s = retry_pause_s
        self._prefix = store.keys.events("")            # a channel is this prefix + the job id
        self._listeners: dict[str, set[queue.SimpleQueue]] = {}
        self._lock = threading.Lock()
        self._down_since: Optional[float] = time.monotonic()  # not subscribed yet
        self._thread: Optional[threading.Thread] = None

    def listen(self, job_id: str) -> queue.SimpleQueue:
        """A queue of the job's live events (JSON text), and RESYNC markers. Close it with `unlisten`."""
        self._start()
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        with self._lock:
            self._listeners.setdefault(self._prefix + job_id, set()).add(inbox)
        return inbox

    def unlisten(self, job_id: str, inbox: queue.SimpleQueue) -> None:
        channel = self._prefix + job_id
        with self._lock:
            inboxes = self._listeners.get(channel)
            if inboxes is not None:
                inboxes.discard(inbox)
                if not inboxes:
                    del self._listeners[channel]

    def down_for(self, job_id: Optional[str] = None) -> float:
        """Seconds since the hub lost (or has not yet made) its subscription; 0 while subscribed."""
        since = self._down_since
        return 0.0 if since is None else time.monotonic() - since

    # --- the hub's own thread (a greenlet under gevent)
    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="event-hub", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            pubsub = self.store.redis.pubsub()
            try:
                pubsub.psubscribe(self._prefix + "*")
                while (confirm := pubsub.get_message(timeout=5.0)) is None or confirm["type"] != "psubscribe":
                    pass  # wait until Redis confirms: from then on, no event is missed
                self._down_since = None
                self._broadcast(RESYNC)  # anything published while we were away is in the logs
                while True:
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None and message["type"] == "pmessage":
                        self._deliver(message["channel"], message["data"])
            except REDIS_DOWN as exc:
                if self._down_since is None:
                    log.warning("event hub: lost Redis (%s); reconnecting", exc)
                    self._down_since = time.monotonic()
            except Exception:  # a bug must not end every stream of the process: log it, start over
                log.exception("event hub failed; restarting it")
                self._down_since = self._down_since or time.monotonic()
            finally:
                try:
                    pubsub.close()
                except Exception:
                    pass
            time.sleep(self.retry_pause_s)

    def _deliver(self, channel: str, data: str) -> None:
        with self._lock:
            inboxes = list(self._listeners.get(channel, ()))
        for inbox in inboxes:
            inbox.put(data)

    def _broadcast(self, item) -> None:
        with self._lock:
            inboxes = [inbox for group in self._listeners.values() for inbox in group]
        for inbox in inboxes:
            inbox.put(item)


class ShardedEventHub:
    """An EventHub per shard of the job store: a job's stream listens on the hub of the Redis its job lives on.
    Each hub connects when its first stream listens."""

    def __init__(self, store: ShardedJobStore, retry_pause_s: float = 0.5):
        self.store = store
        self.hubs = [EventHub(shard, retry_pause_s) for shard in store.shards]

    def _hub(self, job_id: str) -> EventHub:
        return self.hubs[self.store.index_of(job_id)]

    def listen(self, job_id: str) -> queue.SimpleQueue:
        return self._hub(job_id).listen(job_id)

    def unlisten(self, job_id: str, inbox: queue.SimpleQueue) -> None:
        self._hub(job_id).unlisten(job_id, inbox)

    def down_for(self, job_id: Optional[str] = None) -> float:
        """How long the job's shard's subscription has been down (any job: the longest)."""
        if job_id is not None:
            return self._hub(job_id).down_for()
        return max(hub.down_for() for hub in self.hubs)


class EventRelay:
    """A job's events with seq > after_seq, in order, exactly once (see the module's docstring). Yields None
    as a keep-alive tick when nothing came for `keepalive_s`."""

    def __init__(self, store: ShardedJobStore, hub: ShardedEventHub, job_id: str, after_seq: int, keepalive_s: float,
                 reconnect_s: float = 30.0, new_job: bool = False):
        self.store = store
        self.hub = hub
        self.job_id = job_id
        self.after_seq = after_seq
        self.keepalive_s = keepalive_s
        self.reconnect_s = reconnect_s
        self.inbox: Optional[queue.SimpleQueue] = hub.listen(job_id)  # before the log is read
        # Subscribed now, before the job exists: nothing of it can have been published. (If the subscription
        # drops later, the hub's RESYNC makes this relay read the log then.)
        self._replay_first = not (new_job and hub.down_for(job_id) == 0)

    def events(self, deadline: Optional[float]) -> Iterator[Optional[JobEvent]]:
        last_seq = self.after_seq
        replay_needed = self._replay_first
        last_yield = time.monotonic()
        outage_since: Optional[float] = None
        while deadline is None or time.monotonic() < deadline:
            batch: list[JobEvent] = []
            try:
                if replay_needed:
                    # Read together: a job over by then has its final event in this log. (Read one after
                    # the other, a job finishing in between could look over with its final event unseen.)
                    status, batch = self.store.status_and_log(self.job_id, after_seq=last_seq)
                    over = status is None or status.is_terminal  # gone (expired) counts as over
                    replay_needed = False
                    if over and not any(e.is_final for e in batch):
                        yield from (e for e in batch if e.seq > last_seq)
                        return  # the client resumed at or after the end: nothing more will come
                else:
                    for item in self._take(timeout=min(1.0, self.keepalive_s)):
                        if item is RESYNC:
                            replay_needed = True
                        else:
                            batch.append(JobEvent.model_validate_json(item))
                    if not batch and self.hub.down_for(self.job_id) > self.reconnect_s:
                        raise StreamInterrupted(self.job_id)
                outage_since = None
            except REDIS_DOWN:  # reading the log: keep the stream open, retry the replay
                outage_since = outage_since or time.monotonic()
                if time.monotonic() - outage_since > self.reconnect_s:
                    raise StreamInterrupted(self.job_id)
                time.sleep(0.5)
            for event in batch:
                if event.seq <= last_seq:
                    continue  # already yielded (from the log, or before a resync)
                last_yield = time.monotonic()
                yield event
                last_seq = event.seq
                if event.is_final:
                    return
            if not batch and time.monotonic() - last_yield >= self.keepalive_s:
                last_yield = time.monotonic()
                yield None

    def _take(self, timeout: float) -> list:
        """What the hub delivered: wait up to `timeout` for the first item, then take all that are there."""
        try:
            items = [self.inbox.get(timeout=timeout)]
        except queue.Empty:
            return []
        while True:
            try:
                items.append(self.inbox.get_nowait())
            except queue.Empty:
                return items

    def close(self) -> None:
        inbox, self.inbox = self.inbox, None
        if inbox is not None:
            self.hub.unlisten(self.job_id, inbox)
