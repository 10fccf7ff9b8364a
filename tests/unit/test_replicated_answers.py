"""On a Sentinel set a client is told of a change only once a replica has it (jobs/redis_connection.py's
ReplicaWait): a job's creation (tested with the failover itself), and here a file's upload and removal, a
batch's creation and a cancel. A stand-in for the ReplicaWait counts what each settles, on the real Redis."""
from __future__ import annotations

import io

from jobs.batches import BatchStore
from jobs.files import FileStore
from jobs.shards import ShardedJobStore
from jobs.store import JobStore
from tests.unit.conftest import new_job


class CountingWait:
    def __init__(self):
        self.settled = 0

    def confirm(self, client, key, ttl_s):
        return 1

    def settle(self, client, channel):
        self.settled += 1
        return 1


def test_files_batches_and_cancels_are_settled_before_the_answer(redis_client, prefix):
    store = JobStore(redis_client, prefix, ttl_s=600)
    store.replica_wait = wait = CountingWait()
    jobs = ShardedJobStore([store])
    files, batches = FileStore(jobs, prefix), BatchStore(jobs, prefix)

    meta = files.save_stream(io.BytesIO(b'{"a": 1}\\n'), "in.jsonl", "batch", "o")
    assert wait.settled == 1
    batches.create("o", meta.id, "/v1/chat/completions", "24h", None)
    assert wait.settled == 2
    files.delete(meta)
    assert wait.settled == 3
    jobs.cancel(new_job(store))
    assert wait.settled == 4
