"""JobStore: every read and write of job records, events, leases and heartbeats goes through here.

Every event goes to two places in one round trip: the job's event log (a Redis Stream, kept as long as the
job, so a client can replay or resume) and its pub/sub channel (the live relay).

A running attempt holds the job's lease (a token, renewed while it runs). Its events and its final state
are written only while it still holds the lease (Lua, atomically), so an attempt that lost its lease (its
worker froze, or the reaper gave the job to another worker) can no longer write anything: a job finishes
once, and its stream never has a repeated or interleaved event.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Iterable, Optional

import redis

from jobs.paging import newest_first
from jobs.records import JobError, JobEvent, JobRecord, JobResult, JobStatus, Keys, log_id
from jobs.scripts import ScriptSet
from jobs.telemetry import JobTelemetry

NOT_FINISHED = (JobStatus.QUEUED, JobStatus.IN_PROGRESS)
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)  # Redis away (a restart): retry, don't fail the job
FENCED = -1  # what the scripts answer when the caller's lease is gone

# KEYS: job, lease, leases, queued. ARGV: token, lease ms, now ms, worker, now s, job id.
# Returns the attempt number, 0 if the job is not queued/running, FENCED if another attempt holds it.
_ACQUIRE = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'queued' and status ~= 'in_progress' then return 0 end
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return -1 end
redis.call('ZADD', KEYS[3], tonumber(ARGV[3]) + tonumber(ARGV[2]), ARGV[6])
redis.call('ZREM', KEYS[4], ARGV[6])
local attempt = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'status', 'in_progress', 'worker', ARGV[4], 'attempt_started_at', ARGV[5])
if redis.call('HEXISTS', KEYS[1], 'started_at') == 0 then redis.call('HSET', KEYS[1], 'started_at', ARGV[5]) end
return attempt
"""

# KEYS: lease, log, leases, cancel. ARGV: token, lease ms, now ms, channel, job id, log ttl s, then
# (event id, event json for the log, event json for the live channel) triples; events already in the log
# are skipped, so a retried write is harmless.
# Returns 1 if the job was asked to cancel, 0 if not, FENCED.
_PUBLISH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
local last_seq = -1
if last[1] then last_seq = tonumber(string.sub(last[1][1], 3)) - 1 end
for i = 7, #ARGV, 3 do
  if tonumber(string.sub(ARGV[i], 3)) - 1 > last_seq then  -- a retried write skips what is already in
    redis.call('XADD', KEYS[2], ARGV[i], 'e', ARGV[i + 1])
    redis.call('PUBLISH', ARGV[4], ARGV[i + 2])
  end
end
redis.call('EXPIRE', KEYS[2], ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[3], tonumber(ARGV[3]) + tonumber(ARGV[2]), ARGV[5])
return redis.call('EXISTS', KEYS[4])
"""

# KEYS: job, log, lease, leases. ARGV: allowed statuses (comma-separated), channel, log ttl s, event id,
# event json, token ('' = no lease needed: a job cancelled while queued), job id, key prefix, then
# field/value pairs. The log write goes first: it fails on a repeated event id before anything changed.
_FINISH = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status or not string.find(',' .. ARGV[1] .. ',', ',' .. status .. ',', 1, true) then return 0 end
if ARGV[6] ~= '' and redis.call('GET', KEYS[3]) ~= ARGV[6] then return -1 end
redis.call('XADD', KEYS[2], ARGV[4], 'e', ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('HSET', KEYS[1], unpack(ARGV, 9))
redis.call('DEL', KEYS[3])
redis.call('ZREM', KEYS[4], ARGV[7])
redis.call('ZREM', ARGV[8] .. ':queued', ARGV[7])
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner then redis.call('ZREM', ARGV[8] .. ':owner:' .. owner .. ':unfinished', ARGV[7]) end
redis.call('PUBLISH', ARGV[2], ARGV[5])
return 1
"""

# KEYS: lease, leases. ARGV: token, lease ms, now ms, job id. 1 if still ours (renewed), else 0.
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], tonumber(ARGV[3]) + tonumber(ARGV[2]), ARGV[4])
return 1
"""

# KEYS: leases. ARGV: now ms, key prefix, limit, now s. Jobs whose lease lapsed (their worker died) go back
# to queued, exactly once (ZREM decides); returns [id, kind, queue, ...] to enqueue again.
_REAP = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(ids) do
  local job = ARGV[2] .. ':job:' .. id
  local pttl = redis.call('PTTL', job .. ':lease')
  if pttl > 0 then
    redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + pttl, id)
  elseif redis.call('ZREM', KEYS[1], id) == 1 and redis.call('HGET', job, 'status') == 'in_progress' then
    redis.call('HSET', job, 'status', 'queued', 'requeued_at', ARGV[4])
    redis.call('ZADD', ARGV[2] .. ':queued', ARGV[4], id)  -- sent again: watched until it starts
    out[#out + 1] = id
    out[#out + 1] = redis.call('HGET', job, 'kind') or 'interactive'
    out[#out + 1] = redis.call('HGET', job, 'queue') or 'interactive'
  end
end
return out
"""


# KEYS: queued. ARGV: cutoff s (sent before it), key prefix, limit, now s. A job still queued long after it was
# sent, while its queue is empty, was taken by a worker that died before starting it (its message waits in
# that worker's unacked set until the visibility timeout): send it again. Returns [id, kind, queue, ...].
_REAP_LOST = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(ids) do
  local job = ARGV[2] .. ':job:' .. id
  local status = redis.call('HGET', job, 'status')
  if status ~= 'queued' then
    redis.call('ZREM', KEYS[1], id)
  else
    local queue = redis.call('HGET', job, 'queue') or 'interactive'
    if redis.call('LLEN', queue) == 0 then
      redis.call('ZADD', KEYS[1], ARGV[4], id)
      out[#out + 1] = id
      out[#out + 1] = redis.call('HGET', job, 'kind') or 'interactive'
      out[#out + 1] = queue
    end
  end
end
return out
"""


class JobNotFound(KeyError):
    pass


def _statuses(allowed: Iterable[JobStatus]) -> str:
    return ",".join(s.value for s in allowed)


def _now_ms() -> int:
    return int(time.time() * 1000)


class JobStore:
    def __init__(self, client: redis.Redis, prefix: str, ttl_s: int, lease_s: float = 10.0):
        self.redis = client
        self.prefix = prefix
        self.keys = Keys(prefix)
        self.ttl_s = ttl_s
        self.lease_ms = int(lease_s * 1000)
        # A pipeline that calls one of these runs through `self.scripts.run` (jobs/scripts.py).
        self.scripts = ScriptSet(client)
        self._acquire = self.scripts.register(_ACQUIRE)
        self._publish = self.scripts.register(_PUBLISH)
        self._finish = self.scripts.register(_FINISH)
        self._renew = self.scripts.register(_RENEW)
        self._reap = self.scripts.register(_REAP)
        self._reap_lost = self.scripts.register(_REAP_LOST)
        self.telemetry = JobTelemetry(client, prefix, ttl_s, scripts=self.scripts)

    @classmethod
    def from_settings(cls, settings) -> "JobStore":
        client = redis.Redis.from_url(settings.redis_url, decode_responses=True, health_check_interval=30,
                                      socket_keepalive=True, socket_connect_timeout=3, socket_timeout=15,
                                      retry_on_timeout=True)
        return cls(client, settings.redis_prefix, settings.job_ttl_s, settings.job_lease_s)

    # --- records
    def create(self, record: JobRecord) -> None:
        key = self.keys.job(record.id)

        def fill(pipe) -> None:
            pipe.hset(key, mapping=record.to_redis())
            pipe.expire(key, self.ttl_s)
            self.telemetry.job_state(record.id, JobStatus.QUEUED, pipe=pipe, now=record.created_at)
            pipe.zadd(self.keys.queued(), {record.id: record.created_at})  # until a worker starts it
            if record.kind != "batch":  # batch lines are bounded by their batch's window instead
                pipe.zadd(self.keys.owner_unfinished(record.owner), {record.id: record.created_at})
                pipe.expire(self.keys.owner_unfinished(record.owner), self.ttl_s)
            if record.kind == "background":
                index = self.keys.owner_jobs(record.owner)
                pipe.zadd(index, {record.id: record.created_at})
                pipe.zremrangebyscore(index, "-inf", time.time() - 2 * self.ttl_s)  # long-expired entries
                pipe.expire(index, 2 * self.ttl_s)

        self.scripts.run(fill)

    def get(self, job_id: str) -> JobRecord:
        fields = self.redis.hgetall(self.keys.job(job_id))
        if not fields:
            raise JobNotFound(job_id)
        return JobRecord.from_redis(fields)

    def get_with_cancel_flag(self, job_id: str) -> tuple[JobRecord, bool]:
        """The record, and whether a cancel was asked for, in one round trip: what a worker reads before it
        starts a job."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.keys.job(job_id))
            pipe.exists(self.keys.cancel(job_id))
            fields, cancel = pipe.execute()
        if not fields:
            raise JobNotFound(job_id)
        return JobRecord.from_redis(fields), bool(cancel)

    def admission_counts(self, queue: str, owner: str, older_than_s: float) -> tuple[int, int]:
        """In one round trip: the messages waiting in Celery's list for `queue`, and the owner's queued and
        running jobs (entries older than `older_than_s` are stale: dropped)."""
        key = self.keys.owner_unfinished(owner)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.llen(queue)
            pipe.zremrangebyscore(key, "-inf", time.time() - older_than_s)
            pipe.zcard(key)
            depth, _, unfinished = pipe.execute()
        return depth, unfinished

    # --- attempts: lease, renew, reap
    def acquire(self, job_id: str, worker: str) -> tuple[int, str]:
        """Start an attempt: (attempt number, lease token). Attempt 0: not runnable (finished or gone);
        FENCED: another live attempt holds it."""
        token = uuid.uuid4().hex
        attempt = self._acquire(keys=[self.keys.job(job_id), self.keys.lease(job_id), self.keys.leases(),
                                      self.keys.queued()],
                                args=[token, self.lease_ms, _now_ms(), worker, repr(time.time()), job_id])
        if int(attempt) > 0:
            self.telemetry.job_state(job_id, JobStatus.IN_PROGRESS)
        return int(attempt), token

    def renew(self, leases: dict[str, str]) -> list[str]:
        """Renew many leases in one round trip; returns the job ids whose lease was lost."""
        def fill(pipe) -> None:
            for job_id, token in leases.items():
                self._renew(keys=[self.keys.lease(job_id), self.keys.leases()],
                            args=[token, self.lease_ms, _now_ms(), job_id], client=pipe)

        results = self.scripts.run(fill, transaction=False)
        return [job_id for job_id, ok in zip(leases, results) if not ok]

    def reap(self, limit: int = 100) -> list[tuple[str, str, str]]:
        """Jobs whose attempt died (lease lapsed): set back to queued; [(job id, kind, queue)] to enqueue."""
        flat = self._reap(keys=[self.keys.leases()], args=[_now_ms(), self.prefix, limit, repr(time.time())])
        self.telemetry.record(states=[(job_id, JobStatus.QUEUED) for job_id in flat[::3]])
        return list(zip(flat[::3], flat[1::3], flat[2::3]))

    def reap_lost(self, stall_s: float, limit: int = 100) -> list[tuple[str, str, str]]:
        """Queued jobs whose message was lost with a dead worker: [(job id, kind, queue)] to send again."""
        now = time.time()
        flat = self._reap_lost(keys=[self.keys.queued()], args=[now - stall_s, self.prefix, limit, now])
        return list(zip(flat[::3], flat[1::3], flat[2::3]))

    def finish(self, job_id: str, status: JobStatus, final_event: JobEvent,
               result: Optional[JobResult] = None, error: Optional[JobError] = None,
               only_from: Iterable[JobStatus] = NOT_FINISHED, token: str = "", client=None) -> int:
        """Record the terminal state and publish the final event, atomically. 1: done; 0: the job was not in
        one of the `only_from` states (e.g. already finished); FENCED: `token` no longer holds the lease."""
        fields = ["status", status.value, "finished_at", repr(time.time())]
        if result is not None:
            fields += ["result", result.model_dump_json()]
        if error is not None:
            fields += ["error", error.model_dump_json()]
        event_json = final_event.model_dump_json(exclude_none=True)
        answer = self._finish(
            keys=[self.keys.job(job_id), self.keys.event_log(job_id), self.keys.lease(job_id), self.keys.leases()],
            args=[_statuses(only_from), self.keys.events(job_id), self.ttl_s, final_event.log_id, event_json,
                  token, job_id, self.prefix, *fields], client=client)
        if client is not None:
            return answer  # in a pipeline (run by scripts.run): the answer comes then; the caller records the state
        if int(answer) == 1:
            self.telemetry.job_state(job_id, status)
        return int(answer)

    # --- events and cancellation
    def publish_deltas(self, job_id: str, token: str, events: list[JobEvent], client=None) -> int:
        """Log and publish delta events, renewing the lease, in one round trip (or as part of `client`, a
        pipeline). Returns 1 when the job was asked to cancel, 0 if not, FENCED if this attempt lost its
        lease."""
        args = [token, self.lease_ms, _now_ms(), self.keys.events(job_id), job_id, self.ttl_s]
        for event in events:  # the log keeps the token ids (for a resume); live listeners need only the text
            args += [event.log_id, event.model_dump_json(exclude_none=True),
                     event.model_dump_json(exclude_none=True, exclude={"token_ids"})]
        answer = self._publish(keys=[self.keys.lease(job_id), self.keys.event_log(job_id), self.keys.leases(),
                                     self.keys.cancel(job_id)], args=args, client=client)
        return answer if client is not None else int(answer)

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
    def list_owner_jobs(self, owner: str, limit: int, after: Optional[str] = None) -> tuple[list[str], bool]:
        return newest_first(self.redis, self.keys.owner_jobs(owner), limit, after)

    def owns(self, owner: str, job_id: str) -> bool:
        return self.redis.zscore(self.keys.owner_jobs(owner), job_id) is not None

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
