"""Job state over several Redis nodes: which node holds a job, and the job store that routes to it.

Everything about one job (record, event log, live channel, lease, cancel flag) lives on one node, its
*shard*, chosen from its id alone (`shard_index`: CRC-32 of the id, modulo the number of shards), so every
process finds it without asking anyone. Settings: `REDIS_SHARDS`, a comma-separated list of Redis URLs
(plain Redis or Sentinel sets, jobs/redis_connection.py); empty, the one shard is `REDIS_URL`. Its order is
part of the data's layout: append shards only to a drained deployment, and never reorder them.

Each shard is a complete job store for its jobs (jobs/store.py): a change of a job's state is one script on
its shard, and the indexes that script keeps in step with the job are the shard's own: the leases and the
queued set the reapers sweep, its fair queues (jobs/fair_queue.py), the owners' unfinished-job and
background-job indexes, the metrics' state sets. Readers that span jobs ask every shard and add up
(admission counts, metrics, listings merged by creation time); sweeps (reapers, fair dispatch) visit every
shard. Objects that must change in one step with a job get ids on the job's shard (`colocated_id`: a batch's
line jobs and its output files, with the batch).

The *home* node is `REDIS_URL`'s: the Celery broker, the workers' heartbeats and the model directory (read by
everyone, written once a second per worker), and the directories of files and batches. Heartbeats are also
written to every shard, where the lost-delivery reaper's script reads them beside the jobs.

The Celery broker stays one Redis: its traffic is per job (a message in, a message out), not per token.
"""
from __future__ import annotations

import heapq
import logging
import math
import zlib
from typing import Callable, Iterable, Optional

from jobs.fair_queue import FairQueue, TakeOffer
from jobs.records import JobEvent, JobRecord, JobStatus, Keys
from jobs.store import REDIS_DOWN, JobStore
from jobs.transition import Attempt, Ending, Transition, Write

log = logging.getLogger(__name__)


def shard_index(object_id: str, shards: int) -> int:
    """The shard that holds the object with this id (a job, a batch, a file), of `shards`."""
    return zlib.crc32(object_id.encode()) % shards if shards > 1 else 0


def parse_redis_shards(setting: str) -> list[str]:
    """The Redis URLs REDIS_SHARDS names, in order (empty: none, the one shard is REDIS_URL's)."""
    return [url.strip() for url in (setting or "").split(",") if url.strip()]


def new_id_on(make_id: Callable[[], str], shard: int, shards: int) -> str:
    """A new id from `make_id` (random) that lands on `shard`: about `shards` tries."""
    while True:
        object_id = make_id()
        if shard_index(object_id, shards) == shard:
            return object_id


class ShardedJobStore:
    """The job store of a deployment: JobStore's operations, each on the shard its job lives on, and those
    that span jobs on every shard. One shard: the one JobStore, unchanged."""

    def __init__(self, shards: list[JobStore], home: Optional[JobStore] = None):
        if not shards:
            raise ValueError("a job store needs at least one shard")
        self.shards = shards
        self.home = home if home is not None else shards[0]
        # One script sees a whole pool only on the only shard, on the broker's Redis (create's take at record
        # time, transitions' word on parked jobs); over several, another's parked jobs (or the Celery list,
        # elsewhere) would go unseen, so each shard parks every job and its transitions say nothing of them.
        self.holds_whole_pools = len(shards) == 1 and shards[0] is self.home
        for shard in shards:
            shard.holds_whole_pools = self.holds_whole_pools
        self._nodes = [self.home] + [s for s in shards if s is not self.home]  # each Redis once
        self.fair = ShardedFairQueue([s.fair for s in shards], self.home.redis,
                                     on_broker=[s is self.home for s in shards])

    @classmethod
    def from_settings(cls, settings) -> "ShardedJobStore":
        home = JobStore.from_settings(settings)
        urls = parse_redis_shards(settings.redis_shards)
        if not urls:
            return cls([home])
        if len(set(urls)) != len(urls):
            raise ValueError(f"REDIS_SHARDS names a Redis twice: {settings.redis_shards!r}")
        shards = [home if url == settings.redis_url else JobStore.from_settings(settings, redis_url=url)
                  for url in urls]
        return cls(shards, home)

    # --- where things are
    @property
    def redis(self):
        """The home node's client (heartbeats, models, files, batch directories; Celery's lists)."""
        return self.home.redis

    @property
    def keys(self) -> Keys:
        return self.home.keys

    @property
    def prefix(self) -> str:
        return self.home.prefix

    def index_of(self, object_id: str) -> int:
        return shard_index(object_id, len(self.shards))

    def of(self, object_id: str) -> JobStore:
        """The shard of a job (or of a batch or file: the same rule)."""
        return self.shards[self.index_of(object_id)]

    def colocated_id(self, make_id: Callable[[], str], with_id: str) -> str:
        """A new id (from `make_id`) on the same shard as `with_id`."""
        return new_id_on(make_id, self.index_of(with_id), len(self.shards))

    def ping(self) -> None:
        """Every node answers, or this raises (what /ready asks)."""
        for store in self._nodes:
            store.redis.ping()

    # --- one job: its shard
    def create(self, record: JobRecord, parked: bool = False, offer: Optional[TakeOffer] = None) -> bool:
        return self.of(record.id).create(record, parked, offer)

    def get(self, job_id: str) -> JobRecord:
        return self.of(job_id).get(job_id)

    def start(self, job_id: str, worker: str) -> tuple[Transition, Attempt]:
        return self.of(job_id).start(job_id, worker)

    def start_with_record(self, job_id: str, worker: str) -> tuple[Transition, Attempt, Optional[JobRecord]]:
        return self.of(job_id).start_with_record(job_id, worker)

    def write(self, attempt: Attempt, events: list[JobEvent], ending: Optional[Ending] = None,
              acknowledged: int = 0) -> Transition:
        return self.of(attempt.job_id).write(attempt, events, ending, acknowledged)

    def end(self, job_id: str, ending: Ending) -> Transition:
        return self.of(job_id).end(job_id, ending)

    def cancel(self, job_id: str) -> Transition:
        return self.of(job_id).cancel(job_id)

    def request_cancel(self, job_id: str) -> None:
        self.of(job_id).request_cancel(job_id)

    def mark_delivered(self, job_id: str, worker: str) -> None:
        self.of(job_id).mark_delivered(job_id, worker)

    def status_and_log(self, job_id: str, after_seq: int = -1) -> tuple[Optional[JobStatus], list[JobEvent]]:
        return self.of(job_id).status_and_log(job_id, after_seq)

    def read_log(self, job_id: str, after_seq: int = -1, count: Optional[int] = None) -> list[JobEvent]:
        return self.of(job_id).read_log(job_id, after_seq, count)

    def settle(self, job_id: str) -> None:
        """JobStore.settle on the job's shard (what its relay has read is on a replica before it is shown)."""
        self.of(job_id).settle()

    def owns(self, owner: str, job_id: str) -> bool:
        return self.of(job_id).owns(owner, job_id)

    # --- many jobs: grouped by shard, one round trip per shard
    def write_many(self, writes: list[Write]) -> list:
        """JobStore.write_many per shard; answers in `writes`' order. The writes of a shard that is away get
        its error (a REDIS_DOWN instance: the publisher keeps them to retry, and the other shards' runs go
        on); only if every shard is away does this raise, as JobStore.write_many does."""
        answers: list = [None] * len(writes)
        groups = self._by_shard(w.attempt.job_id for w in writes)
        away = 0
        for store, places in groups:
            try:
                done = store.write_many([writes[i] for i in places])
            except REDIS_DOWN as exc:
                done, away = [exc] * len(places), away + 1
                if away == len(groups):
                    raise
            for place, answer in zip(places, done):
                answers[place] = answer
        return answers

    def renew(self, attempts: Iterable[Attempt]) -> list[Attempt]:
        """JobStore.renew per shard. A shard that is away is skipped (nothing can reap its jobs meanwhile
        either): it must not keep the other shards' leases from being renewed."""
        attempts = list(attempts)
        groups = self._by_shard(a.job_id for a in attempts)
        return [attempt for lost in self._on_each([store for store, _ in groups],
                                                  lambda store, i: store.renew([attempts[p] for p in groups[i][1]]))
                for attempt in lost]

    def _by_shard(self, job_ids: Iterable[str]) -> list[tuple[JobStore, list[int]]]:
        places: dict[int, list[int]] = {}
        for place, job_id in enumerate(job_ids):
            places.setdefault(self.index_of(job_id), []).append(place)
        return [(self.shards[index], group) for index, group in places.items()]

    def _on_each(self, stores: list, call) -> list:
        """call(store, i) for each store, skipping those whose Redis is away (logged); raises only if every one
        is (as one JobStore would)."""
        results, away = [], []
        for i, store in enumerate(stores):
            try:
                results.append(call(store, i))
            except REDIS_DOWN as exc:
                away.append(exc)
        if away and len(away) == len(stores):
            raise away[0]
        if away:
            log.warning("%d of %d Redis shard(s) away (%s); going on with the others", len(away), len(stores),
                        away[0])
        return results

    # --- every shard (one that is away is skipped: its jobs wait for it)
    def reap(self, limit: int = 100) -> list[tuple[str, str, str]]:
        return [found for found_here in self._on_each(self.shards, lambda store, _: store.reap(limit))
                for found in found_here]

    def reap_lost(self, stall_s: float, limit: int = 100) -> list[tuple[str, str, str]]:
        """JobStore.reap_lost on every shard. A job is lost only if its Celery list is empty, and that list is
        on the home node: a shard that is not it gets the lengths read there (a queue that drains meanwhile
        counts as busy this sweep, lost at the next)."""
        def one(store: JobStore, _):
            if store is self.home:
                return store.reap_lost(stall_s, limit)  # its script reads Celery's lists itself
            queues = sorted(store.stale_queues(stall_s, limit))
            with self.home.redis.pipeline(transaction=False) as pipe:
                for queue in queues:
                    pipe.llen(queue)
                lengths = dict(zip(queues, pipe.execute())) if queues else {}
            return store.reap_lost(stall_s, limit, queue_lengths=lengths)

        return [found for found_here in self._on_each(self.shards, one) for found in found_here]

    def admission_counts(self, queue: str, owner: str, older_than_s: float) -> tuple[int, int]:
        """Added up over the nodes: Celery's list is on the home node only (elsewhere its length is 0), each
        shard parks and counts its own jobs."""
        waiting = unfinished = 0
        for store in self._nodes:
            w, u = store.admission_counts(queue, owner, older_than_s)
            waiting, unfinished = waiting + w, unfinished + u
        return waiting, unfinished

    def list_owner_jobs(self, owner: str, limit: int, after: Optional[str] = None) -> tuple[list[str], bool]:
        """Newest first across every shard (merged by creation time); `after`: the last id of the previous
        page."""
        if len(self.shards) == 1:
            return self.shards[0].list_owner_jobs(owner, limit, after)
        below = None
        if after is not None:
            below = self.of(after).owner_job_score(owner, after)
            if below is None:
                return [], False
        pages = [store.owner_jobs_below(owner, below, limit + 1) for store in self.shards]
        merged = heapq.merge(*pages, key=lambda entry: (-entry[1], entry[0]))
        ids = [job_id for job_id, _ in merged][:limit + 1]
        return ids[:limit], len(ids) > limit

    def job_counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """JobStore.job_counts, added up over the shards."""
        current: dict[str, int] = {}
        entered: dict[str, int] = {}
        for store in self.shards:
            now, ever = store.job_counts()
            for state, n in now.items():
                current[state] = current.get(state, 0) + n
            for state, n in ever.items():
                entered[state] = entered.get(state, 0) + n
        return current, entered

    def add_record(self, pipe, record: JobRecord) -> None:
        """JobStore.add_record, in a pipeline of the record's shard (the caller's: `of(record.id).redis`)."""
        self.of(record.id).add_record(pipe, record)

    # --- workers (home; heartbeats on every shard too, for the lost-delivery reaper there)
    def heartbeat(self, worker: str, info: dict, ttl_s: float, model: Optional[dict] = None) -> None:
        self._on_each(self._nodes, lambda store, _: store.heartbeat(worker, info, ttl_s,
                                                                    model=model if store is self.home else None))

    def remove_heartbeat(self, worker: str) -> None:
        for store in self._nodes:
            store.remove_heartbeat(worker)

    def live_workers(self) -> list[dict]:
        return self.home.live_workers()


class ShardedFairQueue:
    """Every shard's fair queues of a pool, taken from in turn (the shard to start with rotates), within one
    room: the Celery list on the home node."""

    def __init__(self, queues: list[FairQueue], broker, on_broker: list[bool]):
        self.queues = queues
        self.broker = broker
        self.on_broker = on_broker  # which shard's Redis is the broker's (its script sees Celery's list itself)
        self._next = 0

    def take(self, queue: str, room: int, key_cap: int = 0, stale_before: Optional[float] = None,
             active_s: float = 60.0) -> list[str]:
        """FairQueue.take over the shards: the room left after what each took goes to the next."""
        if len(self.queues) == 1 and self.on_broker[0]:  # its script sees Celery's list itself
            return self.queues[0].take(queue, room, key_cap, stale_before, active_s)
        # A shard's script subtracts the Celery list of its own Redis: empty unless it is the broker's.
        in_celery = int(self.broker.llen(queue))
        left = int(room) - in_celery
        # A key's share of the pool, split over the shards its jobs spread across.
        cap = math.ceil(key_cap / len(self.queues)) if key_cap > 0 else 0
        start, self._next = self._next, (self._next + 1) % len(self.queues)
        taken: list[str] = []
        for i in (start + k for k in range(len(self.queues))):
            if left <= 0:
                break
            index = i % len(self.queues)
            shard_room = left + (in_celery if self.on_broker[index] else 0)
            got = self.queues[index].take(queue, shard_room, cap, stale_before, active_s)
            taken += got
            left -= len(got)
        return taken

    def confirm_sent(self, job_ids: Iterable[str]) -> None:
        groups: dict[int, list[str]] = {}
        for job_id in job_ids:
            groups.setdefault(shard_index(job_id, len(self.queues)), []).append(job_id)
        for index, ids in groups.items():
            self.queues[index].confirm_sent(ids)

    def in_flight(self, queue: str, owner: str) -> int:
        return sum(q.in_flight(queue, owner) for q in self.queues)

    def parked_count(self, queue: str) -> int:
        return sum(q.parked_count(queue) for q in self.queues)

    def parked_by_owner(self, queue: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for q in self.queues:
            for owner, n in q.parked_by_owner(queue).items():
                counts[owner] = counts.get(owner, 0) + n
        return counts
