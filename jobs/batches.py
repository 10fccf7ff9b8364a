"""Batch records in Redis: OpenAI's batch object plus what driving it needs (a cursor into the input file,
the set of line jobs in flight, the lists that become the output and error files)."""
from __future__ import annotations

import json
import time
import uuid
from typing import Optional

import redis

from jobs.paging import newest_first
from jobs.records import Keys

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

# KEYS: in-flight set, batch, output or error list ('' = none). ARGV: job id, line, the count to add one to
# ('' = none: a cancelled line). The line goes out only if this call took the job out of the set: with two
# drivers at once, each finished line is appended and counted exactly once.
_COLLECT = """
if redis.call('SREM', KEYS[1], ARGV[1]) == 0 then return 0 end
if KEYS[3] ~= '' then redis.call('RPUSH', KEYS[3], ARGV[2]) end
if ARGV[3] ~= '' then redis.call('HINCRBY', KEYS[2], ARGV[3], 1) end
return 1
"""


class BatchStore:
    def __init__(self, client: redis.Redis, prefix: str):
        self.redis = client
        self.keys = Keys(prefix)
        self._move = client.register_script(_MOVE)
        self._take_lease = client.register_script(_TAKE_LEASE)
        self._collect = client.register_script(_COLLECT)

    def create(self, owner: str, input_file_id: str, endpoint: str, completion_window: str,
               metadata: Optional[dict]) -> dict:
        now = int(time.time())
        batch = {
            "id": f"batch_{uuid.uuid4().hex}", "status": "validating", "owner": owner, "endpoint": endpoint,
            "input_file_id": input_file_id, "completion_window": completion_window, "created_at": now,
            "expires_at": now + COMPLETION_WINDOWS[completion_window], "total": 0, "completed": 0, "failed": 0,
            "cursor": 0, "metadata": json.dumps(metadata) if metadata else "",
            # The output and error files' ids are chosen now; they are published when the batch finalizes.
            "output_list": f"file-{uuid.uuid4().hex}", "error_list": f"file-{uuid.uuid4().hex}",
        }
        with self.redis.pipeline() as pipe:
            pipe.hset(self.keys.batch(batch["id"]), mapping={k: str(v) for k, v in batch.items()})
            pipe.zadd(self.keys.owner_batches(owner), {batch["id"]: now})
            pipe.sadd(self.keys.active_batches(), batch["id"])
            pipe.execute()
        return self.get(batch["id"])

    def get(self, batch_id: str) -> Optional[dict]:
        fields = self.redis.hgetall(self.keys.batch(batch_id))
        if not fields:
            return None
        for name in ("created_at", "expires_at", "total", "completed", "failed", "cursor", *TIMESTAMPS):
            if name in fields:
                fields[name] = int(fields[name])
        return fields

    def update(self, batch_id: str, **fields) -> None:
        if not fields:
            return
        self.redis.hset(self.keys.batch(batch_id), mapping={k: str(v) for k, v in fields.items()})

    def move(self, batch_id: str, status: str, only_from: tuple[str, ...], **fields) -> bool:
        """Set the batch's status (and its `{status}_at`, and `fields`) if it is now one of `only_from`."""
        extra = [str(v) for pair in fields.items() for v in pair]
        return bool(self._move(keys=[self.keys.batch(batch_id)],
                               args=[status, f"{status}_at", int(time.time()), ",".join(only_from), *extra]))

    def list_ids(self, owner: str, limit: int, after: Optional[str]) -> tuple[list[str], bool]:
        return newest_first(self.redis, self.keys.owner_batches(owner), limit, after)

    def active(self) -> list[str]:
        return list(self.redis.smembers(self.keys.active_batches()))

    def deactivate(self, batch_id: str) -> None:
        self.redis.srem(self.keys.active_batches(), batch_id)

    def take_lease(self, batch_id: str, holder: str, ttl_ms: int) -> bool:
        """One API process drives a batch at a time; the lease is renewed every tick and lapses on a crash."""
        return bool(self._take_lease(keys=[self.keys.batch_lease(batch_id)], args=[holder, ttl_ms]))

    def collect(self, batch_id: str, job_id: str, line: Optional[str] = None, list_id: str = "",
                counter: str = "failed") -> bool:
        """Take a finished line job out of the batch's in-flight set and, if this call did, append its `line`
        to the list `list_id` (if any) and add one to `counter` (if any). False: another driver had it."""
        keys = [self.keys.batch_inflight(batch_id), self.keys.batch(batch_id),
                self.keys.file_lines(list_id) if list_id else ""]
        return bool(self._collect(keys=keys, args=[job_id, line or "", counter]))


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
