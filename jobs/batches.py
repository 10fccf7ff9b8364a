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


class BatchStore:
    def __init__(self, client: redis.Redis, prefix: str):
        self.redis = client
        self.keys = Keys(prefix)

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

    def set_status(self, batch_id: str, status: str) -> None:
        self.update(batch_id, status=status, **{f"{status}_at": int(time.time())})

    def list_ids(self, owner: str, limit: int, after: Optional[str]) -> tuple[list[str], bool]:
        return newest_first(self.redis, self.keys.owner_batches(owner), limit, after)

    def active(self) -> list[str]:
        return list(self.redis.smembers(self.keys.active_batches()))

    def deactivate(self, batch_id: str) -> None:
        self.redis.srem(self.keys.active_batches(), batch_id)

    def take_lease(self, batch_id: str, holder: str, ttl_ms: int) -> bool:
        """One API process drives a batch at a time; the lease is renewed every tick and lapses on a crash."""
        key = self.keys.batch_lease(batch_id)
        if self.redis.set(key, holder, nx=True, px=ttl_ms):
            return True
        if self.redis.get(key) == holder:
            self.redis.pexpire(key, ttl_ms)
            return True
        return False


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
