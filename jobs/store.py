"""JobStore: every read and write of job records, events, leases and heartbeats goes through here.

Every change of a job's state (started, its events, ended, put back on the queue) is one transition
(jobs/transition.py): one Lua script that checks who may make it, numbers the events from the job's log, and
writes record, log (a Redis Stream, kept as long as the job, so a client can replay or resume) and live
channel (pub/sub) together. A running attempt holds the job's lease (a token, renewed while its engine makes
progress); an attempt that lost it (its worker froze, or the reaper gave the job to another worker) can no
longer write anything, and the API ends only jobs that no attempt runs: a job finishes once, and its stream
never has a repeated or interleaved event.
"""
from __future__ import annotations

import dataclasses
import json
import time
import uuid
from typing import Iterable, Optional

import redis

from jobs.fair_queue import FairQueue, TakeOffer
from jobs.paging import newest_first
from jobs.records import JobError, JobEvent, JobRecord, JobStatus, Keys, log_id
from jobs.scripts import ScriptSet
from jobs.telemetry import JobTelemetry
from jobs.transition import APPEND
from jobs.transition import SCRIPT as TRANSITION
from jobs.transition import Attempt, Ending, Outcome, Transition, Write, event_args

REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)  # Redis away (a restart): retry, don't fail the job

# Runs per APPEND call: one call is atomic, so Redis serves nothing else meanwhile; this bounds how long.
APPEND_MAX_RUNS = 64

# KEYS: lease, leases. ARGV: token, lease ms, now ms, job id. 1 if still ours (renewed), else 0.
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], tonumber(ARGV[3]) + tonumber(ARGV[2]), ARGV[4])
return 1
"""

# KEYS: queued, workers. ARGV: cutoff s (sent before it), key prefix, limit, now s, then '' (Celery's lists are
# in this Redis: LLEN them) or the lengths of the queues' lists on the broker, where it is another node (a shard's:
# jobs/shards.py) as queue, length pairs (a queue not among them: judged at a later sweep). A job still queued long
# after it was sent lost its message if the worker it was delivered to is dead (it died before starting it:
# the message waits in that worker's unacked set until the visibility timeout, an hour). Without a delivery
# on record, an empty queue says the same (the send itself was lost); and so does a job a fair dispatcher
# took from its key's queue and never confirmed sending (it died, or the send failed: jobs/fair_queue.py),
# however busy the queue. A parked job has no message yet: never lost (its key's queue holds it). Returns
# [id, kind, queue, ...].
_REAP_LOST = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local now = tonumber(ARGV[4])
local remote = ARGV[5] ~= ''
local lengths = {}
for i = 5, #ARGV - 1, 2 do lengths[ARGV[i]] = tonumber(ARGV[i + 1]) end
local out = {}
for _, id in ipairs(ids) do
  local job = ARGV[2] .. ':job:' .. id
  local status = redis.call('HGET', job, 'status')
  local fair = redis.call('HGET', job, 'fair')
  if status ~= 'queued' or fair == 'parked' then
    redis.call('ZREM', KEYS[1], id)
  else
    local queue = redis.call('HGET', job, 'queue') or 'interactive'
    local receiver = redis.call('HGET', job, 'delivered_to')
    local lost
    if receiver then
      local alive_until = redis.call('ZSCORE', KEYS[2], receiver)
      lost = not alive_until or tonumber(alive_until) < now
    elseif fair == 'sending' then
      lost = true
    elseif remote then
      lost = lengths[queue] == 0  -- nil (not read): not now
    else
      lost = redis.call('LLEN', queue) == 0
    end
    if lost then
      redis.call('ZADD', KEYS[1], now, id)
      redis.call('HDEL', job, 'delivered_to')
      out[#out + 1] = id
      out[#out + 1] = redis.call('HGET', job, 'kind') or 'interactive'
      out[#out + 1] = queue
    end
  end
end
return out
"""


# KEYS: job. ARGV: worker. Who holds a queued job's message (cleared when an attempt starts or it is requeued).
_MARK_DELIVERED = """
if redis.call('HGET', KEYS[1], 'status') == 'queued' then redis.call('HSET', KEYS[1], 'delivered_to', ARGV[1]) end
return 0
"""


class JobNotFound(KeyError):
    pass


def _now_ms() -> int:
    return int(time.time() * 1000)


class JobStore:
    # On a Sentinel set (from_settings): a new record waits for a replica's confirmation (jobs/redis_connection.py).
    replica_wait = None
    # Whether this store's Redis holds every pool's whole fair queue and Celery list (one Redis), so that what a
    # transition sees of a pool's parked jobs is the whole truth (Transition.parked); a shard among several
    # does not (jobs/shards.py).
    holds_whole_pools = True

    def __init__(self, client: redis.Redis, prefix: str, ttl_s: int, lease_s: float = 10.0):
        self.redis = client
        self.prefix = prefix
        self.keys = Keys(prefix)
        self.ttl_s = ttl_s
        self.lease_ms = int(lease_s * 1000)
        # A pipeline that calls one of these runs through `self.scripts.run` (jobs/scripts.py).
        self.scripts = ScriptSet(client)
        self._transition_script = self.scripts.register(TRANSITION)
        self._append_script = self.scripts.register(APPEND)
        self._renew = self.scripts.register(_RENEW)
        self._reap_lost = self.scripts.register(_REAP_LOST)
        self._mark_delivered = self.scripts.register(_MARK_DELIVERED)
        self.telemetry = JobTelemetry(client, prefix, ttl_s, scripts=self.scripts)
        self.fair = FairQueue(client, prefix, ttl_s, self.scripts)  # per-key queues (jobs/fair_queue.py)

    @classmethod
    def from_settings(cls, settings, redis_url: Optional[str] = None) -> "JobStore":
        """The store on REDIS_URL's Redis, or on `redis_url` (a shard: jobs/shards.py)."""
        from jobs.redis_connection import redis_client, replica_wait  # plain Redis or a Sentinel set's master
        url = redis_url or settings.redis_url
        store = cls(redis_client(url), settings.redis_prefix, settings.job_ttl_s, settings.job_lease_s)
        store.replica_wait = replica_wait(url)  # a Sentinel set: creates wait for a replica (create)
        return store

    # --- records
    def create(self, record: JobRecord, parked: bool = False, offer: Optional[TakeOffer] = None) -> bool:
        """Record a new job. `parked`: it waits in its key's queue of its pool (jobs/fair_queue.py) until a
        dispatcher sends it, unless `offer` lets it skip that queue (nobody waits on the pool): then the answer
        is True, and the caller sends it now and confirms, as after a dispatcher's take. Not parked: the caller
        sends it now."""
        park_at = None

        def fill(pipe) -> None:
            nonlocal park_at
            self.add_record(pipe, record, watched=not parked)
            if parked:
                park_at = len(pipe)
                self.fair.park(pipe, record, offer if self.holds_whole_pools else None)
            self.telemetry.job_state(record.id, JobStatus.QUEUED, pipe=pipe, now=record.created_at, new=True)
            if record.kind != "batch":  # batch lines are bounded by their batch's window instead
                pipe.zadd(self.keys.owner_unfinished(record.owner), {record.id: record.created_at})
                pipe.expire(self.keys.owner_unfinished(record.owner), self.ttl_s)
            if record.kind == "background":
                index = self.keys.owner_jobs(record.owner)
                pipe.zadd(index, {record.id: record.created_at})
                pipe.zremrangebyscore(index, "-inf", time.time() - 2 * self.ttl_s)  # long-expired entries
                pipe.expire(index, 2 * self.ttl_s)

        results = self.scripts.run(fill)
        if self.replica_wait is not None:
            self._confirm_replicated(record)
        return park_at is not None and int(results[park_at]) == 1

    def _confirm_replicated(self, record: JobRecord) -> None:
        """On a Sentinel set: return once a replica has the new record, so that the id the API is about to
        give out survives a failover (replication is asynchronous: a master that dies loses what it had not
        sent). If that cannot be promised (ReplicaWait raises NotReplicated: a lagging replica, a failover under
        way; or Redis went away meanwhile), withdraw the job if Redis lets us, so that it does not run behind the
        client's back, and raise: a REDIS_DOWN error, the API's 503, and the client retries. A master with no
        replica at all accepts it alone, as one Redis would."""
        try:
            self.replica_wait.confirm(self.redis, self.keys.job(record.id), self.ttl_s)
        except REDIS_DOWN:
            error = JobError(message="The job could not be recorded durably; it was not run.",
                             type="service_unavailable", code="queue_unavailable")
            try:
                self.end(record.id, Ending.failed(error))
            except REDIS_DOWN:
                pass
            raise

    def settle(self, job_id: Optional[str] = None) -> None:
        """On a Sentinel set: return once a replica has everything this master took so far (ReplicaWait.settle),
        so that events shown to a client after this survive a failover; a REDIS_DOWN error (NotReplicated) when
        that cannot be promised now: retry. Nothing to do on a plain Redis. (`job_id`: the job whose events are
        to be shown; one store holds them all, so any: ShardedJobStore.settle's signature.)"""
        if self.replica_wait is not None:
            self.replica_wait.settle(self.redis, f"{self.prefix}:replicated")

    def add_record(self, pipe, record: JobRecord, watched: bool = True) -> None:
        """A new queued job's record, as part of the caller's pipeline (a batch's feed writes its line jobs
        together with its own bookkeeping): watched from now until an attempt starts it. Not `watched` where
        the park script that follows in the same pipeline decides (it watches a job it takes, not one it parks)."""
        key = self.keys.job(record.id)
        pipe.hset(key, mapping=record.to_redis())
        pipe.expire(key, self.ttl_s)
        if watched:
            pipe.zadd(self.keys.queued(), {record.id: record.created_at})

    def get(self, job_id: str) -> JobRecord:
        fields = self.redis.hgetall(self.keys.job(job_id))
        if not fields:
            raise JobNotFound(job_id)
        return JobRecord.from_redis(fields)

    def admission_counts(self, queue: str, owner: str, older_than_s: float) -> tuple[int, int]:
        """In one round trip: the jobs waiting for `queue` (messages in Celery's list, and jobs parked in its
        per-key queues), and the owner's queued (parked or sent) and running jobs (entries older than
        `older_than_s` are stale: dropped)."""
        key = self.keys.owner_unfinished(owner)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.llen(queue)
            pipe.zcard(self.fair.parked(queue))
            pipe.zremrangebyscore(key, "-inf", time.time() - older_than_s)
            pipe.zcard(key)
            in_celery, parked, _, unfinished = pipe.execute()
        return in_celery + parked, unfinished

    # --- every change of a job's state: one script (jobs/transition.py)
    def start(self, job_id: str, worker: str) -> tuple[Transition, Attempt]:
        """Start an attempt under a new lease. Applied: `detail[0]` is its number (1 for a first attempt), and
        the attempt knows the seq of its first event; FENCED: another live attempt holds the job; TERMINAL
        (`detail[0]`: the status it ended with) / MISSING: nothing to run."""
        started, attempt, _ = self.start_with_record(job_id, worker)
        return started, attempt

    def start_with_record(self, job_id: str, worker: str) -> tuple[Transition, Attempt, Optional[JobRecord]]:
        """`start`, and the record as the start left it (None unless applied), in the same round trip: what a
        worker needs to run the attempt (cancel_requested: a cancel was asked for)."""
        token = uuid.uuid4().hex
        done = self._transition(job_id, "start", token=token, worker=worker)
        if not done.applied:
            return done, Attempt(job_id, token), None
        number, first_seq, flat, parked = done.detail
        record = JobRecord.from_redis(dict(zip(flat[::2], flat[1::2])))
        return (Transition(done.outcome, done.cancel_requested, (int(number),), self._parked_hint(parked)),
                Attempt(job_id, token, first_seq=int(first_seq)), record)

    def _parked_hint(self, flag) -> Optional[bool]:
        """A transition's word on its pool's parked jobs, if this store holds the whole pool."""
        return bool(int(flag)) if self.holds_whole_pools else None

    def write(self, attempt: Attempt, events: list[JobEvent], ending: Optional[Ending] = None,
              acknowledged: int = 0) -> Transition:
        """An attempt's new events (`acknowledged`: how many of its events earlier writes were answered for:
        the first of these is seq `attempt.first_seq + acknowledged`, so a retry after a lost answer logs
        nothing twice), and its end if it has one. FENCED once the attempt lost its lease."""
        done = self.write_many([Write(attempt, events, ending, acknowledged)])[0]
        if isinstance(done, Exception):
            raise done
        return done

    def write_many(self, writes: list[Write]) -> list:
        """Many attempts' writes in one round trip (a worker's publisher cycle): each end is its own transition,
        and the runs that only have events (or a cancel check) share APPEND calls. Per write, its Transition,
        or the error its script raised (that write alone failed); a Redis outage raises."""
        ends = [i for i, w in enumerate(writes) if w.ending is not None]
        appends = [i for i, w in enumerate(writes) if w.ending is None]
        groups = [appends[i:i + APPEND_MAX_RUNS] for i in range(0, len(appends), APPEND_MAX_RUNS)]

        def fill(pipe) -> None:
            for i in ends:
                self._write_end(writes[i], client=pipe)
            for group in groups:
                self._append([writes[i] for i in group], client=pipe)

        results = self._run_many(fill)
        answers: list = [None] * len(writes)
        for i, result in zip(ends, results):
            if isinstance(result, Exception):
                answers[i] = result
            else:
                done = Transition.from_reply(result)
                applied = done.outcome is Outcome.APPLIED
                answers[i] = dataclasses.replace(done, parked=self._parked_hint(done.detail[0]) if applied else None)
        for group, result in zip(groups, results[len(ends):]):
            if isinstance(result, Exception):  # one write broke the call: find which, each on its own
                result = self._append_each([writes[i] for i in group])
            for i, outcome, cancel in zip(group, result[::2], result[1::2]):
                answers[i] = outcome if isinstance(outcome, Exception) else Transition(Outcome(outcome),
                                                                                       bool(int(cancel)))
        return answers

    def _append_each(self, writes: list[Write]) -> list:
        """APPEND per write, as flat (outcome, cancel) pairs; a write whose call failed: (its error, 0)."""
        def fill(pipe) -> None:
            for write in writes:
                self._append([write], client=pipe)

        return [part for reply in self._run_many(fill)
                for part in ((reply, 0) if isinstance(reply, Exception) else reply)]

    def _run_many(self, fill) -> list:
        results = self.scripts.run(fill, transaction=False, raise_on_error=False)
        for result in results:
            if isinstance(result, REDIS_DOWN):
                raise result
        return results

    def _write_end(self, write: Write, client) -> None:
        self._transition(write.attempt.job_id, "write", token=write.attempt.token,
                         events=[*write.events, write.ending.event], ending=write.ending,
                         first_seq=write.attempt.first_seq + write.acknowledged, client=client)

    def _append(self, writes: list[Write], client) -> None:
        keys, args = [], [self.ttl_s, repr(time.time())]
        for write in writes:
            job_id = write.attempt.job_id
            events = event_args(write.events)
            keys += [self.keys.job(job_id), self.keys.lease(job_id), self.keys.event_log(job_id),
                     self.keys.cancel(job_id)]
            args += [write.attempt.token, self.keys.events(job_id), write.attempt.first_seq + write.acknowledged,
                     int(write.acknowledged == 0), int(write.check_cancel), len(events) // 2, *events]
        self._append_script(keys=keys, args=args, client=client)

    def end(self, job_id: str, ending: Ending) -> Transition:
        """End a job that no attempt runs (a cancel while it waits, a job the API could not queue, a duplicate
        delivery past its deadline). RUNNING: an attempt holds it, ask that one to stop (`request_cancel`)."""
        return self._transition(job_id, "end", events=[ending.event], ending=ending)

    def cancel(self, job_id: str) -> Transition:
        """A client's cancel: a job that no attempt runs ends here, cancelled; a running one is asked to stop
        (the cancel flag, which its attempt's next write reports): then the answer is RUNNING."""
        done = self.end(job_id, Ending.cancelled())
        if done.outcome is Outcome.RUNNING:
            self.request_cancel(job_id)
        self.settle()  # on a Sentinel set: the client's answer survives a failover
        return done

    def reap(self, limit: int = 100) -> list[tuple[str, str, str]]:
        """Jobs whose attempt died (lease lapsed), back to queued, each by exactly one reaper (the transition
        decides): [(job id, kind, queue)] to send again, straight to their Celery queue, not parked: each
        already waited its turn once, may have a client reading its half-written stream, and there are at
        most as many as the dead worker ran."""
        due = self.redis.zrangebyscore(self.keys.leases(), "-inf", _now_ms(), start=0, num=limit)
        if not due:
            return []
        def fill(pipe) -> None:
            for job_id in due:
                self._transition(job_id, "requeue", client=pipe)

        replies = self.scripts.run(fill, transaction=False)
        return [(job_id, *done.detail) for job_id, done in zip(due, map(Transition.from_reply, replies))
                if done.applied]

    def _transition(self, job_id: str, action: str, token: str = "", worker: str = "",
                    events: Iterable[JobEvent] = (), ending: Optional[Ending] = None, first_seq: int = 0,
                    client=None):
        fields = ending.fields() if ending is not None else []
        reply = self._transition_script(
            keys=[self.keys.job(job_id), self.keys.lease(job_id), self.keys.event_log(job_id), self.keys.leases(),
                  self.keys.queued(), self.keys.cancel(job_id)],
            args=[action, job_id, token, _now_ms(), repr(time.time()), self.lease_ms, self.keys.events(job_id),
                  self.ttl_s, self.prefix, worker, first_seq, ending.status.value if ending else "",
                  len(fields) // 2, *fields, *event_args(list(events))],
            client=client)
        return reply if client is not None else Transition.from_reply(reply)

    # --- leases of running attempts, and lost deliveries
    def renew(self, attempts: Iterable[Attempt]) -> list[Attempt]:
        """Renew many attempts' leases in one round trip; returns the attempts whose lease was lost."""
        attempts = list(attempts)

        def fill(pipe) -> None:
            for attempt in attempts:
                self._renew(keys=[self.keys.lease(attempt.job_id), self.keys.leases()],
                            args=[attempt.token, self.lease_ms, _now_ms(), attempt.job_id], client=pipe)

        results = self.scripts.run(fill, transaction=False)
        return [attempt for attempt, ok in zip(attempts, results) if not ok]

    def reap_lost(self, stall_s: float, limit: int = 100,
                  queue_lengths: Optional[dict[str, int]] = None) -> list[tuple[str, str, str]]:
        """Queued jobs whose message was lost with a dead worker: [(job id, kind, queue)] to send again.
        `queue_lengths`: where Celery's lists are on another node (this store is a shard), their lengths
        there, for the queues of `stale_queues`."""
        now = time.time()
        lengths = [""] if queue_lengths is None else [part for item in queue_lengths.items() for part in item]
        flat = self._reap_lost(keys=[self.keys.queued(), self.keys.workers()],
                               args=[now - stall_s, self.prefix, limit, now, *lengths])
        return list(zip(flat[::3], flat[1::3], flat[2::3]))

    def stale_queues(self, stall_s: float, limit: int = 100) -> set[str]:
        """The queues of the jobs `reap_lost` looks at now (sent more than `stall_s` ago, still queued)."""
        ids = self.redis.zrangebyscore(self.keys.queued(), "-inf", time.time() - stall_s, start=0, num=limit)
        if not ids:
            return set()
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hget(self.keys.job(job_id), "queue")
            return {queue or "interactive" for queue in pipe.execute()}

    def mark_delivered(self, job_id: str, worker: str) -> None:
        """A worker received the job's message (not started yet): if that worker dies before it starts the
        job, `reap_lost` sends it again, however busy its queue. Only for a job still queued."""
        self._mark_delivered(keys=[self.keys.job(job_id)], args=[worker])

    # --- events and cancellation
    def status_and_log(self, job_id: str, after_seq: int = -1) -> tuple[Optional[JobStatus], list[JobEvent]]:
        """The job's status and its logged events with seq > after_seq, read together (one MULTI, one round
        trip): a job over by then has its final event in that log (the two are written in one script)."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hget(self.keys.job(job_id), "status")
            pipe.xrange(self.keys.event_log(job_id), min=log_id(after_seq + 1))
            status, entries = pipe.execute()
        return JobStatus(status) if status else None, _log_events(entries)

    def read_log(self, job_id: str, after_seq: int = -1, count: Optional[int] = None) -> list[JobEvent]:
        """Logged events with seq > after_seq, in order."""
        return _log_events(self.redis.xrange(self.keys.event_log(job_id), min=log_id(after_seq + 1), count=count))

    def request_cancel(self, job_id: str) -> None:
        self.redis.set(self.keys.cancel(job_id), "1", ex=self.ttl_s)

    # --- listing an owner's background jobs (newest first, cursor = the last id seen)
    def job_counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """Jobs in each state now and that ever entered it (the metrics: jobs/telemetry.py)."""
        return self.telemetry.job_counts()

    def list_owner_jobs(self, owner: str, limit: int, after: Optional[str] = None) -> tuple[list[str], bool]:
        return newest_first(self.redis, self.keys.owner_jobs(owner), limit, after)

    def owns(self, owner: str, job_id: str) -> bool:
        return self.owner_job_score(owner, job_id) is not None

    def owner_job_score(self, owner: str, job_id: str) -> Optional[float]:
        """When the owner's background job was created, if it is in its index."""
        return self.redis.zscore(self.keys.owner_jobs(owner), job_id)

    def owner_jobs_below(self, owner: str, below: Optional[float], limit: int) -> list[tuple[str, float]]:
        """Up to `limit` (id, creation time) of the owner's background jobs created before `below` (None: any),
        newest first: one shard's part of a listing merged across shards."""
        top = "+inf" if below is None else f"({below}"
        return self.redis.zrevrangebyscore(self.keys.owner_jobs(owner), top, "-inf", start=0, num=limit,
                                           withscores=True)

    # --- worker heartbeats
    def heartbeat(self, worker: str, info: dict, ttl_s: float, model: Optional[dict] = None) -> None:
        """A worker is alive; and (if given) the model it serves, in the model directory."""
        now = time.time()
        with self.redis.pipeline() as pipe:
            pipe.set(self.keys.worker(worker), json.dumps(info), px=int(ttl_s * 1000))
            pipe.zadd(self.keys.workers(), {worker: now + ttl_s})
            pipe.zremrangebyscore(self.keys.workers(), "-inf", now - 3600)  # long dead: forget them
            if model is not None:
                pipe.hset(self.keys.models(), model["id"], json.dumps({**model, "last_seen": time.time()}))
            pipe.execute()

    def remove_heartbeat(self, worker: str) -> None:
        with self.redis.pipeline() as pipe:
            pipe.delete(self.keys.worker(worker))
            pipe.zrem(self.keys.workers(), worker)
            pipe.execute()

    def live_workers(self) -> list[dict]:
        """The heartbeats of the workers alive now. Read through the `workers` index, never by scanning the
        keyspace: that holds every job's keys, and the model directory reads this every second."""
        names = self.redis.zrangebyscore(self.keys.workers(), time.time(), "+inf")
        values = self.redis.mget([self.keys.worker(name) for name in names]) if names else []
        return [json.loads(v) for v in values if v]


def _log_events(entries) -> list[JobEvent]:
    """The events of XRANGE entries of a job's event log."""
    return [JobEvent.model_validate_json(fields["e"]) for _, fields in entries]
