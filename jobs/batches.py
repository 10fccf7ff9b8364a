"""Batch records in Redis: OpenAI's batch object plus what driving it needs (a cursor into the input file,
the set of line jobs in flight, the lists that become the output and error files).

Over several Redis nodes (REDIS_SHARDS, jobs/shards.py) a batch's keys (`batch:{id}`, its in-flight set,
custom_ids and lease) live on the shard its id hashes to, and so does everything that changes in one step
with them, by id: its line jobs (`line_job_id`: the feed writes their records with the in-flight set and the
cursor in one MULTI) and its output and error files (chosen at creation: the collector's script moves a line
out of the in-flight set and into one of them atomically). An owner's batches and the active batches are
indexes on the home node, written after the batch (jobs/files.py's Placement says how they stay correct).
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Optional, Union

import redis

from jobs.files import FileStore, Placement
from jobs.paging import newest_first
from jobs.records import JobRecord, Keys
from jobs.shards import ShardedJobStore
from jobs.store import JobStore

TIMESTAMPS = ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at",
              "cancelled_at")
FINAL = ("completed", "failed", "expired", "cancelled")
COMPLETION_WINDOWS = {"24h": 24 * 3600}


# KEYS: batch. ARGV: new status, its timestamp field, now, the statuses it may come from (comma-separated),
# then field/value pairs to set with it. 1 if the batch moved. A batch changes status only through this: a
# cancel and the driver's next step can never overwrite each other's change.
_MOVE = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status or not string.find(',' .. ARGV[4] .. ',', ',' .. status .. ',', 1, true) then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1], ARGV[2], ARGV[3], unpack(ARGV, 5))
return 1
"""

# KEYS: lease. ARGV: holder, ttl ms. 1 if the holder has the lease now (taken or renewed), else 0: one
# step, so a lease that lapses between a check and a renewal can never end up held by two drivers.
_TAKE_LEASE = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# KEYS: in-flight set, batch, output or error list ('' = none), all on the batch's node. ARGV: job id, line,
# the count to add one to ('' = none: a cancelled line). The line goes out only if this call took the job
# out of the set: with two drivers at once, each finished line is appended and counted exactly once.
_COLLECT = """
if redis.call('SREM', KEYS[1], ARGV[1]) == 0 then return 0 end
if KEYS[3] ~= '' then redis.call('RPUSH', KEYS[3], ARGV[2]) end
if ARGV[3] ~= '' then redis.call('HINCRBY', KEYS[2], ARGV[3], 1) end
return 1
"""


class BatchStore:
    """Batches on the nodes of `where` (a ShardedJobStore, a JobStore or one Redis client): the same nodes,
    in the same order, as the job store that runs their line jobs."""

    def __init__(self, where: Union[Placement, ShardedJobStore, JobStore, redis.Redis], prefix: str):
        self.placement = Placement.of(where)
        self.redis = self.placement.home  # the indexes: owners' batches, the active batches
        self.keys = Keys(prefix)
        # Registered once; each call runs on the batch's node (`client=`), which loads it there if needed.
        self._move = self.redis.register_script(_MOVE)
        self._take_lease = self.redis.register_script(_TAKE_LEASE)
        self._collect = self.redis.register_script(_COLLECT)

    def node(self, batch_id: str) -> redis.Redis:
        """The node of the batch's keys, its line jobs and its output and error lists."""
        return self.placement.node(batch_id)

    def line_job_id(self, batch_id: str) -> str:
        """A new line job's id, on the batch's node (the feed's MULTI writes its record there)."""
        return self.placement.colocated_id(JobRecord.new_id, batch_id)

    def create(self, owner: str, input_file_id: str, endpoint: str, completion_window: str,
               metadata: Optional[dict]) -> dict:
        now = int(time.time())
        batch_id = f"batch_{uuid.uuid4().hex}"
        batch = {
            "id": batch_id, "status": "validating", "owner": owner, "endpoint": endpoint,
            "input_file_id": input_file_id, "completion_window": completion_window, "created_at": now,
            "expires_at": now + COMPLETION_WINDOWS[completion_window], "total": 0, "completed": 0, "failed": 0,
            "cursor": 0, "metadata": json.dumps(metadata) if metadata else "",
            # The output and error files' ids are chosen now, on the batch's node (the collector appends to
            # them in one script with the in-flight set); they are published when the batch finalizes.
            "output_list": self.placement.colocated_id(FileStore.new_id, batch_id),
            "error_list": self.placement.colocated_id(FileStore.new_id, batch_id),
        }

        def index(pipe) -> None:  # after the batch: a driver that finds it active finds the batch too
            pipe.zadd(self.keys.owner_batches(owner), {batch_id: time.time()})  # finer than `now`: see FileStore
            pipe.sadd(self.keys.active_batches(), batch_id)

        self.placement.object_then_index(
            batch_id, lambda pipe: pipe.hset(self.keys.batch(batch_id),
                                             mapping={k: str(v) for k, v in batch.items()}), index)
        return self.get(batch_id)

    def get(self, batch_id: str) -> Optional[dict]:
        fields = self.node(batch_id).hgetall(self.keys.batch(batch_id))
        if not fields:
            return None
        for name in ("created_at", "expires_at", "total", "completed", "failed", "cursor", *TIMESTAMPS):
            if name in fields:
                fields[name] = int(fields[name])
        return fields

    def update(self, batch_id: str, **fields) -> None:
        if not fields:
            return
        self.node(batch_id).hset(self.keys.batch(batch_id), mapping={k: str(v) for k, v in fields.items()})

    def move(self, batch_id: str, status: str, only_from: tuple[str, ...], **fields) -> bool:
        """Set the batch's status (and its `{status}_at`, and `fields`) if it is now one of `only_from`."""
        extra = [str(v) for pair in fields.items() for v in pair]
        return bool(self._move(keys=[self.keys.batch(batch_id)],
                               args=[status, f"{status}_at", int(time.time()), ",".join(only_from), *extra],
                               client=self.node(batch_id)))

    def list_ids(self, owner: str, limit: int, after: Optional[str]) -> tuple[list[str], bool]:
        """The owner's batch ids, newest first (the home node's index: `get` answers None for one gone)."""
        return newest_first(self.redis, self.keys.owner_batches(owner), limit, after)

    def active(self) -> list[str]:
        """Batches to drive (the home node's set: one whose batch is gone is dropped by its next step)."""
        return list(self.redis.smembers(self.keys.active_batches()))

    def deactivate(self, batch_id: str) -> None:
        self.redis.srem(self.keys.active_batches(), batch_id)

    def take_lease(self, batch_id: str, holder: str, ttl_ms: int) -> bool:
        """One API process drives a batch at a time; the lease is renewed every tick and lapses on a crash."""
        return bool(self._take_lease(keys=[self.keys.batch_lease(batch_id)], args=[holder, ttl_ms],
                                     client=self.node(batch_id)))

    def inflight(self, batch_id: str) -> list[str]:
        """Ids of the batch's line jobs not yet collected."""
        return list(self.node(batch_id).smembers(self.keys.batch_inflight(batch_id)))

    def inflight_count(self, batch_id: str) -> int:
        return int(self.node(batch_id).scard(self.keys.batch_inflight(batch_id)))

    def add_custom_id(self, batch_id: str, custom_id: str) -> bool:
        """Note a line's custom_id; False if the batch had it already (a duplicate)."""
        return bool(self.node(batch_id).sadd(self.keys.batch_custom_ids(batch_id), custom_id))

    def collect(self, batch_id: str, job_id: str, line: Optional[str] = None, list_id: str = "",
                counter: str = "failed") -> bool:
        """Take a finished line job out of the batch's in-flight set and, if this call did, append its `line`
        to the list `list_id` (if any) and add one to `counter` (if any). False: another driver had it."""
        keys = [self.keys.batch_inflight(batch_id), self.keys.batch(batch_id),
                self.keys.file_lines(list_id) if list_id else ""]
        return bool(self._collect(keys=keys, args=[job_id, line or "", counter], client=self.node(batch_id)))


def to_api(batch: dict) -> dict:
    """The batch object exactly as OpenAI's SDK parses it."""
    metadata = json.loads(batch["metadata"]) if batch.get("metadata") else None
    errors = json.loads(batch["errors"]) if batch.get("errors") else None
    return {
        "id": batch["id"], "object": "batch", "endpoint": batch["endpoint"], "errors": errors,
        "input_file_id": batch["input_file_id"], "completion_window": batch["completion_window"],
        "status": batch["status"], "output_file_id": batch.get("output_file_id") or None,
        "error_file_id": batch.get("error_file_id") or None, "created_at": batch["created_at"],
        "expires_at": batch["expires_at"], **{name: batch.get(name) for name in TIMESTAMPS},
        "request_counts": {"total": batch["total"], "completed": batch["completed"], "failed": batch["failed"]},
        "metadata": metadata,
    }
