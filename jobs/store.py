"""JobStore: every read and write of job records, events and heartbeats goes through here.

Every event goes to two places in one round trip: the job's event log (a Redis Stream, kept as long as the
job, so a client can replay or resume) and its pub/sub channel (the live relay). State changes are
compare-and-set (Lua), so a job cancelled while queued is never started, and a finished job is never
finished twice.
"""
from __future__ import annotations

import json
import time
from typing import Iterable, Optional

import redis

from jobs.paging import newest_first
from jobs.records import JobError, JobEvent, JobRecord, JobResult, JobStatus, Keys, log_id

NOT_FINISHED = (JobStatus.QUEUED, JobStatus.IN_PROGRESS)

# KEYS: job hash, event log. ARGV: allowed statuses (comma-separated), channel, ttl, event id, event json,
# then field/value pairs to set. The log write goes first: it fails on a repeated event id before anything
# has changed.
_FINISH = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status or not string.find(',' .. ARGV[1] .. ',', ',' .. status .. ',', 1, true) then return 0 end
redis.call('XADD', KEYS[2], ARGV[4], 'e', ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('HSET', KEYS[1], unpack(ARGV, 6))
redis.call('PUBLISH', ARGV[2], ARGV[5])
return 1
"""

# KEYS: job hash. ARGV: allowed statuses, then field/value pairs.
_TRANSITION = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status or not string.find(',' .. ARGV[1] .. ',', ',' .. status .. ',', 1, true) then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1
"""


class JobNotFound(KeyError):
    pass


def _statuses(allowed: Iterable[JobStatus]) -> str:
    return ",".join(s.value for s in allowed)


class JobStore:
    def __init__(self, client: redis.Redis, prefix: str, ttl_s: int):
        self.redis = client
        self.keys = Keys(prefix)
        self.ttl_s = ttl_s
        self._finish = client.register_script(_FINISH)
        self._transition = client.register_script(_TRANSITION)

    @classmethod
    def from_settings(cls, settings) -> "JobStore":
        client = redis.Redis.from_url(settings.redis_url, decode_responses=True,
                                      health_check_interval=30, socket_keepalive=True)
        return cls(client, settings.redis_prefix, settings.job_ttl_s)

    # --- records
    def create(self, record: JobRecord) -> None:
        key = self.keys.job(record.id)
        with self.redis.pipeline() as pipe:
            pipe.hset(key, mapping=record.to_redis())
            pipe.expire(key, self.ttl_s)
            if record.kind == "background":
                index = self.keys.owner_jobs(record.owner)
                pipe.zadd(index, {record.id: record.created_at})
                pipe.zremrangebyscore(index, "-inf", time.time() - 2 * self.ttl_s)  # long-expired entries
                pipe.expire(index, 2 * self.ttl_s)
            pipe.execute()

    def get(self, job_id: str) -> JobRecord:
        fields = self.redis.hgetall(self.keys.job(job_id))
        if not fields:
            raise JobNotFound(job_id)
        return JobRecord.from_redis(fields)

    def mark_in_progress(self, job_id: str, worker: str) -> bool:
        """queued (or in progress on a worker that died) -> in_progress; False if it ended meanwhile."""
        return bool(self._transition(keys=[self.keys.job(job_id)], args=[
            _statuses(NOT_FINISHED), "status", JobStatus.IN_PROGRESS.value, "started_at", repr(time.time()),
            "worker", worker]))

    def finish(self, job_id: str, status: JobStatus, final_event: JobEvent,
               result: Optional[JobResult] = None, error: Optional[JobError] = None,
               only_from: Iterable[JobStatus] = NOT_FINISHED) -> bool:
        """Record the terminal state and publish the final event, atomically; False if the job was not in
        one of the `only_from` states (e.g. it had already finished)."""
        fields = ["status", status.value, "finished_at", repr(time.time())]
        if result is not None:
            fields += ["result", result.model_dump_json()]
        if error is not None:
            fields += ["error", error.model_dump_json()]
        event_json = final_event.model_dump_json(exclude_none=True)
        return bool(self._finish(
            keys=[self.keys.job(job_id), self.keys.event_log(job_id)],
            args=[_statuses(only_from), self.keys.events(job_id), self.ttl_s, final_event.log_id, event_json,
                  *fields]))

    # --- events and cancellation
    def publish_deltas(self, job_id: str, events: Iterable[JobEvent]) -> bool:
        """Log and publish delta events in one round trip; returns True when the job was asked to cancel."""
        log, channel = self.keys.event_log(job_id), self.keys.events(job_id)
        with self.redis.pipeline(transaction=False) as pipe:
            for event in events:
                payload = event.model_dump_json(exclude_none=True)
                pipe.xadd(log, {"e": payload}, id=event.log_id)
                pipe.publish(channel, payload)
            pipe.expire(log, self.ttl_s)
            pipe.exists(self.keys.cancel(job_id))
            return bool(pipe.execute()[-1])

    def read_log(self, job_id: str, after_seq: int = -1, count: Optional[int] = None) -> list[JobEvent]:
        """Logged events with seq > after_seq, in order."""
        entries = self.redis.xrange(self.keys.event_log(job_id), min=log_id(after_seq + 1), count=count)
        return [JobEvent.model_validate_json(fields["e"]) for _, fields in entries]

    def request_cancel(self, job_id: str) -> None:
        self.redis.set(self.keys.cancel(job_id), "1", ex=self.ttl_s)

    def is_cancel_requested(self, job_id: str) -> bool:
        return bool(self.redis.exists(self.keys.cancel(job_id)))

    def subscribe(self, job_id: str) -> redis.client.PubSub:
        """Subscribe to a job's events. Do it before enqueueing: pub/sub drops what nobody hears."""
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(self.keys.events(job_id))
        return pubsub

    # --- listing an owner's background jobs (newest first, cursor = the last id seen)
    def list_owner_jobs(self, owner: str, limit: int, after: Optional[str] = None) -> tuple[list[str], bool]:
        return newest_first(self.redis, self.keys.owner_jobs(owner), limit, after)

    def owns(self, owner: str, job_id: str) -> bool:
        return self.redis.zscore(self.keys.owner_jobs(owner), job_id) is not None

    # --- worker heartbeats
    def heartbeat(self, worker: str, info: dict, ttl_s: float) -> None:
        self.redis.set(self.keys.worker(worker), json.dumps(info), px=int(ttl_s * 1000))

    def remove_heartbeat(self, worker: str) -> None:
        self.redis.delete(self.keys.worker(worker))

    def live_workers(self) -> list[dict]:
        names = list(self.redis.scan_iter(match=self.keys.worker_pattern(), count=100))
        values = self.redis.mget(names) if names else []
        return [json.loads(v) for v in values if v]
