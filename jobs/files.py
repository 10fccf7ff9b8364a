"""Files (batch input, output and error files), kept in Redis.

Why Redis and not a directory: every API process and every machine of a deployment already reaches the same
Redis, which the project runs with an append-only file (config/redis.conf: AOF, fsync every second,
no eviction), so files survive restarts and need no shared disk. A file is stored as a list of its lines,
so it is written and read in slices: memory in our processes does not grow with a file's size.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass
from typing import IO, Iterator, Optional

import redis

from jobs.paging import newest_first
from jobs.records import Keys

SLICE = 1000  # lines per Redis round trip


@dataclass
class FileMeta:
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    owner: str
    lines: int

    def to_api(self) -> dict:
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed", "expires_at": None,
                "status_details": None}


class FileStore:
    def __init__(self, client: redis.Redis, prefix: str):
        self.redis = client
        self.keys = Keys(prefix)

    @staticmethod
    def new_id() -> str:
        return f"file-{uuid.uuid4().hex}"

    def save_stream(self, stream: IO[bytes], filename: str, purpose: str, owner: str) -> FileMeta:
        """Store an uploaded file line by line (bytes decoded as UTF-8; a bad byte is a 400 upstream)."""
        file_id = self.new_id()
        size, count, pending = 0, 0, []
        for raw in stream:
            size += len(raw)
            line = raw.decode("utf-8").rstrip("\r\n")
            pending.append(line)
            count += 1
            if len(pending) >= SLICE:
                self.redis.rpush(self.keys.file_lines(file_id), *pending)
                pending = []
        if pending:
            self.redis.rpush(self.keys.file_lines(file_id), *pending)
        return self._register(FileMeta(file_id, size, int(time.time()), filename, purpose, owner, count))

    def create_from_list(self, file_id: str, filename: str, purpose: str, owner: str) -> FileMeta:
        """Turn lines already pushed to `file_lines(file_id)` (a batch's output) into a file."""
        count = self.redis.llen(self.keys.file_lines(file_id))
        size = sum(len(line.encode()) + 1 for line in self.iter_lines(file_id))
        return self._register(FileMeta(file_id, size, int(time.time()), filename, purpose, owner, count))

    def _register(self, meta: FileMeta) -> FileMeta:
        with self.redis.pipeline() as pipe:
            pipe.hset(self.keys.file(meta.id), mapping={k: str(v) for k, v in asdict(meta).items()})
            pipe.zadd(self.keys.owner_files(meta.owner), {meta.id: meta.created_at})
            pipe.execute()
        return meta

    def get(self, file_id: str) -> Optional[FileMeta]:
        fields = self.redis.hgetall(self.keys.file(file_id))
        if not fields:
            return None
        return FileMeta(id=fields["id"], bytes=int(fields["bytes"]), created_at=int(fields["created_at"]),
                        filename=fields["filename"], purpose=fields["purpose"], owner=fields["owner"],
                        lines=int(fields["lines"]))

    def read_lines(self, file_id: str, start: int, count: int) -> list[str]:
        return self.redis.lrange(self.keys.file_lines(file_id), start, start + count - 1)

    def iter_lines(self, file_id: str) -> Iterator[str]:
        start = 0
        while chunk := self.read_lines(file_id, start, SLICE):
            yield from chunk
            start += len(chunk)

    def list_ids(self, owner: str, limit: int, after: Optional[str]) -> tuple[list[str], bool]:
        return newest_first(self.redis, self.keys.owner_files(owner), limit, after)

    def delete(self, meta: FileMeta) -> None:
        with self.redis.pipeline() as pipe:
            pipe.delete(self.keys.file(meta.id), self.keys.file_lines(meta.id))
            pipe.zrem(self.keys.owner_files(meta.owner), meta.id)
            pipe.execute()
