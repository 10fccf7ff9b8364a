"""Files (batch input, output and error files), kept in Redis.

Why Redis and not a directory: every API process and every machine of a deployment already reaches the same
Redis, which the project runs with an append-only file (config/redis.conf: AOF, fsync every second,
no eviction), so files survive restarts and need no shared disk. A file is stored as a list of its lines,
so it is written and read in slices: memory in our processes does not grow with a file's size.

Over several Redis nodes (REDIS_SHARDS, jobs/shards.py), a file's metadata and lines live on the shard its id
hashes to (`Placement`, the same rule as a job's), and an owner's index of files on the home node. A batch's
output and error files get ids on the batch's shard (jobs/batches.py), where its collector appends to them.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass
from typing import IO, Callable, Iterator, Optional, Union

import redis

from jobs.paging import newest_first
from jobs.records import Keys
from jobs.shards import ShardedJobStore, new_id_on, shard_index
from jobs.store import JobStore

SLICE = 1000  # lines per Redis round trip


class Placement:
    """Which Redis holds what, for objects placed by their id (files, batches): each object on the node its
    id hashes to (jobs/shards.py's `shard_index`, the rule that places jobs, over the same list of nodes),
    and the indexes that span objects (an owner's files and batches, the active batches) on the home node.
    One node: everything on it, as before sharding.

    An index cannot change in one transaction with an object on another node, so the two are written in an
    order that leaves nothing a reader trips on (`object_then_index`): the object first, then its index
    entry; and on removal the object first, then the entry. A crash in between leaves at worst an index entry
    whose object is gone, which every reader of an index already skips (as it does for an expired object),
    or an object no index names (its creator got an error and never learned its id)."""

    def __init__(self, nodes: list[redis.Redis], home: Optional[redis.Redis] = None,
                 stores: Optional[list[JobStore]] = None, home_store: Optional[JobStore] = None):
        if not nodes:
            raise ValueError("a placement needs at least one node")
        self.nodes = nodes
        self.home = home if home is not None else nodes[0]
        # The job stores of those nodes, where known: on a Sentinel set, a change is shown to a client only once
        # a replica has it (`settle`), as a job's creation is (JobStore.create).
        self.stores = stores
        self.home_store = home_store

    @classmethod
    def of(cls, where: Union["Placement", ShardedJobStore, JobStore, redis.Redis]) -> "Placement":
        """The placement of a job store's shards (files and batches beside the jobs), or of one client."""
        if isinstance(where, Placement):
            return where
        if isinstance(where, ShardedJobStore):
            return cls([shard.redis for shard in where.shards], where.home.redis, where.shards, where.home)
        if isinstance(where, JobStore):
            return cls([where.redis], stores=[where], home_store=where)
        return cls([where])

    def index_of(self, object_id: str) -> int:
        return shard_index(object_id, len(self.nodes))

    def node(self, object_id: str) -> redis.Redis:
        """The node that holds the object with this id."""
        return self.nodes[self.index_of(object_id)]

    def colocated_id(self, make_id: Callable[[], str], with_id: str) -> str:
        """A new id (from `make_id`) on the node of `with_id`: objects that change in one step together."""
        return new_id_on(make_id, self.index_of(with_id), len(self.nodes))

    def object_then_index(self, object_id: str, object_ops: Callable, index_ops: Callable) -> None:
        """`object_ops(pipe)` on the object's node, then `index_ops(pipe)` on the home node: one transaction
        when they are the same node (one shard), else two, in that order (the class's docstring says why).
        Returns once both are on a replica, on a Sentinel set (`settle`): the caller tells a client next."""
        node = self.node(object_id)
        with node.pipeline() as pipe:
            object_ops(pipe)
            if node is self.home:
                index_ops(pipe)
            pipe.execute()
        if node is not self.home:
            with self.home.pipeline() as pipe:
                index_ops(pipe)
                pipe.execute()
        self.settle(object_id)

    def settle(self, object_id: str) -> None:
        """On a Sentinel set: return once a replica has the object's change and its index's (JobStore.settle):
        what the client is about to be told survives a failover. Nothing to do on a plain Redis."""
        if self.stores is None:
            return
        store = self.stores[self.index_of(object_id)]
        store.settle()
        if self.home_store is not None and self.home_store is not store:
            self.home_store.settle()


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
    """Files on the nodes of `where` (a ShardedJobStore, a JobStore or one Redis client; see Placement)."""

    def __init__(self, where: Union[Placement, ShardedJobStore, JobStore, redis.Redis], prefix: str):
        self.placement = Placement.of(where)
        self.redis = self.placement.home  # the owners' indexes
        self.keys = Keys(prefix)

    @staticmethod
    def new_id() -> str:
        return f"file-{uuid.uuid4().hex}"

    def save_stream(self, stream: IO[bytes], filename: str, purpose: str, owner: str) -> FileMeta:
        """Store an uploaded file line by line (bytes decoded as UTF-8; a bad byte is a 400 upstream)."""
        file_id = self.new_id()
        node = self.placement.node(file_id)
        size, count, pending = 0, 0, []
        for raw in stream:
            size += len(raw)
            line = raw.decode("utf-8").rstrip("\r\n")
            pending.append(line)
            count += 1
            if len(pending) >= SLICE:
                node.rpush(self.keys.file_lines(file_id), *pending)
                pending = []
        if pending:
            node.rpush(self.keys.file_lines(file_id), *pending)
        return self._register(FileMeta(file_id, size, int(time.time()), filename, purpose, owner, count))

    def create_from_list(self, file_id: str, filename: str, purpose: str, owner: str) -> FileMeta:
        """Turn lines already pushed to `file_lines(file_id)` (a batch's output) into a file."""
        count = self.placement.node(file_id).llen(self.keys.file_lines(file_id))
        size = sum(len(line.encode()) + 1 for line in self.iter_lines(file_id))
        return self._register(FileMeta(file_id, size, int(time.time()), filename, purpose, owner, count))

    def has_lines(self, file_id: str) -> bool:
        """Whether any line was pushed to `file_lines(file_id)` (a batch's output list, before it is a file)."""
        return bool(self.placement.node(file_id).exists(self.keys.file_lines(file_id)))

    def _register(self, meta: FileMeta) -> FileMeta:
        # The metadata on the file's node, then the owner's index on the home node (Placement's docstring).
        self.placement.object_then_index(
            meta.id,
            lambda pipe: pipe.hset(self.keys.file(meta.id), mapping={k: str(v) for k, v in asdict(meta).items()}),
            # Scored by the time to the µs, not the record's whole-second created_at: a page that ends inside a
            # second must not skip that second's other files.
            lambda pipe: pipe.zadd(self.keys.owner_files(meta.owner), {meta.id: time.time()}))
        return meta

    def get(self, file_id: str) -> Optional[FileMeta]:
        fields = self.placement.node(file_id).hgetall(self.keys.file(file_id))
        if not fields:
            return None
        return FileMeta(id=fields["id"], bytes=int(fields["bytes"]), created_at=int(fields["created_at"]),
                        filename=fields["filename"], purpose=fields["purpose"], owner=fields["owner"],
                        lines=int(fields["lines"]))

    def read_lines(self, file_id: str, start: int, count: int) -> list[str]:
        return self.placement.node(file_id).lrange(self.keys.file_lines(file_id), start, start + count - 1)

    def iter_lines(self, file_id: str) -> Iterator[str]:
        start = 0
        while chunk := self.read_lines(file_id, start, SLICE):
            yield from chunk
            start += len(chunk)

    def list_ids(self, owner: str, limit: int, after: Optional[str]) -> tuple[list[str], bool]:
        """The owner's file ids, newest first, from the home node's index (an id whose file is gone may be
        among them: `get` answers None for it, and listings skip it)."""
        return newest_first(self.redis, self.keys.owner_files(owner), limit, after)

    def delete(self, meta: FileMeta) -> None:
        # The file first, then its index entry: a crash between leaves an entry listings skip.
        self.placement.object_then_index(
            meta.id,
            lambda pipe: pipe.delete(self.keys.file(meta.id), self.keys.file_lines(meta.id)),
            lambda pipe: pipe.zrem(self.keys.owner_files(meta.owner), meta.id))
