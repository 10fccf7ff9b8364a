"""The live relay: every job's events, from Redis to the streams this API process serves.

`EventHub`: one pub/sub connection per API process and Redis node, subscribed to the channels of the jobs
whose streams this process serves. It hands each message to the streams of that job open here. One connection
instead of one per stream: one socket read carries many streams' events.
`ShardedEventHub`: one EventHub per shard (jobs/shards.py), each stream listening on its job's.

`EventRelay`: one stream's view: the job's events with seq > after_seq, in order, exactly once. Once the hub
says the job's channel is subscribed (RESYNC), it replays the job's event log (a Redis Stream), then takes live
events from the hub, skipping any it has already yielded: nothing falls in between. A relay for a job that
does not exist yet (`new_job`: the API listens before it records the job) waits for the subscription first,
and then needs no replay: every event of the job is published after it, so all come live.

When the hub's connection drops (a Redis restart), events published meanwhile are missed. So after every
(re)connect the hub subscribes again and tells every listener to resync, and each relay replays the log from
the last event it yielded. Meanwhile the client's stream stays open with keep-alives. After `reconnect_s` without Redis, the
relay gives up (StreamInterrupted), and the client can resume later with Last-Event-ID.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from typing import Iterator, Optional

from jobs.records import JobEvent
from jobs.shards import ShardedJobStore
from jobs.store import REDIS_DOWN, JobStore

log = logging.getLogger(__name__)

RESYNC = object()  # put in a listener's queue once its job's channel is (re)subscribed: replay the log
# How long a relay for a job not recorded yet waits for its channel's subscription (a round trip, normally)
# before the API records the job; past it, the stream reads the job's log when the subscription comes.
NEW_JOB_SUBSCRIBE_WAIT_S = 2.0


class StreamInterrupted(Exception):
    """Redis stayed away longer than the relay waits for it."""


class EventHub:
    """One pub/sub connection to one Redis node, subscribed to the channel of each job a stream of this process
    follows (SUBSCRIBE when its first listener comes, UNSUBSCRIBE when its last goes). Per channel, not by
    pattern: a pattern would have Redis write every event of the node to every API process, each dropping
    all but its own streams' (N API processes: N writes per event). A subscription's confirmation reaches
    its listeners as RESYNC: from then on nothing of the job is missed, and what came before is in its log.

    The connection is the hub's own (not the pool's), read only by the hub's thread; listeners' threads
    write their (UN)SUBSCRIBE commands on it under the hub's lock, never read."""

    def __init__(self, store: JobStore, retry_pause_s: float = 0.5):
        self.store = store
        self.retry_pause_s = retry_pause_s
        self._prefix = store.keys.events("")            # a channel is this prefix + the job id
        self._listeners: dict[str, set[queue.SimpleQueue]] = {}
        self._unconfirmed: dict[str, int] = {}          # channel -> SUBSCRIBEs sent, not yet confirmed
        self._lock = threading.Lock()
        self._conn = None                               # connected (its SUBSCRIBEs sent) or None
        self._down_since: Optional[float] = time.monotonic()  # not subscribed yet
        self._thread: Optional[threading.Thread] = None
        # Always subscribed, so that the connection is in pub/sub mode (and its confirmation says it is up).
        self._control = f"{self._prefix}hub:{uuid.uuid4().hex}"

    def listen(self, job_id: str) -> queue.SimpleQueue:
        """A queue of the job's live events (JSON text), and RESYNC markers (the first once its channel is
        subscribed). Close it with `unlisten`."""
        self._start()
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        channel = self._prefix + job_id
        with self._lock:
            inboxes = self._listeners.setdefault(channel, set())
            first = not inboxes
            inboxes.add(inbox)
            if first:
                self._send("SUBSCRIBE", channel)
            elif self._conn is not None and channel not in self._unconfirmed:
                inbox.put(RESYNC)  # subscribed already (another stream of the job): replay from here
        return inbox

    def unlisten(self, job_id: str, inbox: queue.SimpleQueue) -> None:
        channel = self._prefix + job_id
        with self._lock:
            inboxes = self._listeners.get(channel)
            if inboxes is not None:
                inboxes.discard(inbox)
                if not inboxes:
                    del self._listeners[channel]
                    self._send("UNSUBSCRIBE", channel)

    def down_for(self, job_id: Optional[str] = None) -> float:
        """Seconds since the hub lost (or has not yet made) its connection; 0 while connected."""
        since = self._down_since
        return 0.0 if since is None else time.monotonic() - since

    def _send(self, command: str, *channels: str) -> None:
        """Under the lock. Not connected (or the write fails): the next connection subscribes every channel
        wanted then."""
        if self._conn is None:
            return
        try:
            self._conn.send_command(command, *channels, check_health=False)
        except REDIS_DOWN:
            return  # the hub's read fails too, and it reconnects
        if command == "SUBSCRIBE":
            for channel in channels:
                self._unconfirmed[channel] = self._unconfirmed.get(channel, 0) + 1

    # --- the hub's own thread (a greenlet under gevent)
    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="event-hub", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            conn = None
            try:
                conn = self._connect()
                with self._lock:
                    self._conn, self._unconfirmed = conn, {}
                    self._send("SUBSCRIBE", self._control, *self._listeners)
                while True:
                    if conn.can_read(timeout=1.0):
                        replies = [conn.read_response(push_request=True)]
                        while len(replies) < 512 and conn.can_read(timeout=0):
                            replies.append(conn.read_response(push_request=True))
                        if any(reply[0] == "message" for reply in replies):
                            # A Sentinel set: events reach streams once a replica has them (one lost in a
                            # failover must never have been seen); else NotReplicated: resubscribe, replay.
                            self.store.settle()
                        for reply in replies:
                            self._handle(reply)
            except REDIS_DOWN as exc:
                if self._down_since is None:
                    log.warning("event hub: lost Redis (%s); reconnecting", exc)
                    self._down_since = time.monotonic()
            except Exception:  # a bug must not end every stream of the process: log it, start over
                log.exception("event hub failed; restarting it")
                self._down_since = self._down_since or time.monotonic()
            finally:
                with self._lock:
                    self._conn = None
                if conn is not None:
                    try:
                        conn.disconnect()
                    except Exception:
                        pass
            time.sleep(self.retry_pause_s)

    def _connect(self):
        """A connection of the hub's own, made as the store's pool makes them (a Sentinel set's: to its master)."""
        conn = self.store.redis.connection_pool.make_connection()
        conn.health_check_interval = 0  # a PING's reply would be read by the hub's thread, not the sender's
        conn.connect()
        return conn

    def _handle(self, reply) -> None:
        kind, channel, data = reply[0], reply[1], reply[2]
        if kind == "message":
            with self._lock:
                inboxes = list(self._listeners.get(channel, ()))
            for inbox in inboxes:
                inbox.put(data)
        elif kind == "subscribe":
            if channel == self._control:
                self._down_since = None
            with self._lock:
                left = self._unconfirmed.get(channel, 0) - 1
                if left > 0:  # an earlier SUBSCRIBE's (an UNSUBSCRIBE came in between): wait for the last
                    self._unconfirmed[channel] = left
                    return
                self._unconfirmed.pop(channel, None)
                inboxes = list(self._listeners.get(channel, ()))
            for inbox in inboxes:
                inbox.put(RESYNC)  # subscribed: replay the log from here


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
        self.inbox: Optional[queue.SimpleQueue] = hub.listen(job_id)  # its first RESYNC: replay the log
        self._pending: list = []
        if new_job:  # subscribed before the job exists, nothing of it can have been missed: no replay
            try:
                first = self.inbox.get(timeout=NEW_JOB_SUBSCRIBE_WAIT_S)
            except queue.Empty:
                pass  # not subscribed yet: its RESYNC comes later, and the log is read then
            else:
                if first is not RESYNC:
                    self._pending.append(first)

    def events(self, deadline: Optional[float]) -> Iterator[Optional[JobEvent]]:
        last_seq = self.after_seq
        replay_needed = False  # until the hub says the job's channel is subscribed (RESYNC)
        last_yield = time.monotonic()
        outage_since: Optional[float] = None
        while deadline is None or time.monotonic() < deadline:
            batch: list[JobEvent] = []
            try:
                if replay_needed:
                    # Read together: a job over by then has its final event in this log. (Read one after
                    # the other, a job finishing in between could look over with its final event unseen.)
                    status, batch = self.store.status_and_log(self.job_id, after_seq=last_seq)
                    if batch:  # shown once a replica has it (EventHub._run)
                        self.store.settle(self.job_id)
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
        if self._pending:
            items, self._pending = self._pending, []
        else:
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
