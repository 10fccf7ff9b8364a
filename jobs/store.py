"""JobStore: every read and write of job records, events and heartbeats goes through here.

State changes and their events are written in one MULTI/EXEC pipeline, so a subscriber that sees a final
event can read a record that already says so.
"""
from __future__ import annotations

import json
import time
from typing import Iterable, Optional

import redis

from jobs.records import JobError, JobEvent, JobRecord, JobResult, JobStatus, Keys


class JobNotFound(KeyError):
    pass


class JobStore:
    def __init__(self, client: redis.Redis, prefix: str, ttl_s: int):
        self.redis = client
        self.keys = Keys(prefix)
        self.ttl_s = ttl_s

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
            pipe.execute()

    def get(self, job_id: str) -> JobRecord:
        fields = self.redis.hgetall(self.keys.job(job_id))
        if not fields:
            raise JobNotFound(job_id)
        return JobRecord.from_redis(fields)

    def mark_in_progress(self, job_id: str, worker: str) -> None:
        self.redis.hset(self.keys.job(job_id), mapping={
            "status": JobStatus.IN_PROGRESS.value, "started_at": repr(time.time()), "worker": worker})

    def finish(self, job_id: str, status: JobStatus, final_event: JobEvent,
               result: Optional[JobResult] = None, error: Optional[JobError] = None) -> None:
        """Record the terminal state and publish the final event, atomically."""
        fields = {"status": status.value, "finished_at": repr(time.time())}
        if result is not None:
            fields["result"] = result.model_dump_json()
        if error is not None:
            fields["error"] = error.model_dump_json()
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.job(job_id), mapping=fields)
            pipe.publish(self.keys.events(job_id), final_event.model_dump_json(exclude_none=True))
            pipe.execute()

    # --- events and cancellation
    def publish_deltas(self, job_id: str, events: Iterable[JobEvent]) -> bool:
        """Publish delta events in one round trip; returns True when the job has been asked to cancel."""
        with self.redis.pipeline(transaction=False) as pipe:
            for event in events:
                pipe.publish(self.keys.events(job_id), event.model_dump_json(exclude_none=True))
            pipe.exists(self.keys.cancel(job_id))
            return bool(pipe.execute()[-1])

    def request_cancel(self, job_id: str) -> None:
        self.redis.set(self.keys.cancel(job_id), "1", ex=self.ttl_s)

    def is_cancel_requested(self, job_id: str) -> bool:
        return bool(self.redis.exists(self.keys.cancel(job_id)))

    def subscribe(self, job_id: str) -> redis.client.PubSub:
        """Subscribe to a job's events. Do it before enqueueing: pub/sub drops what nobody hears."""
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(self.keys.events(job_id))
        return pubsub

    # --- worker heartbeats
    def heartbeat(self, worker: str, info: dict, ttl_s: float) -> None:
        self.redis.set(self.keys.worker(worker), json.dumps(info), px=int(ttl_s * 1000))

    def remove_heartbeat(self, worker: str) -> None:
        self.redis.delete(self.keys.worker(worker))

    def live_workers(self) -> list[dict]:
        names = list(self.redis.scan_iter(match=self.keys.worker_pattern(), count=100))
        values = self.redis.mget(names) if names else []
        return [json.loads(v) for v in values if v]
