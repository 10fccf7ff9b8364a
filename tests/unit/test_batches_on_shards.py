"""Files and batches on three shards (three databases of the test Redis, one prefix, as three Redis processes
would hold them): a file's metadata and lines on the shard its id picks; a batch's keys, its line jobs and
its output and error lists on the batch's shard (so its feed and collect stay one step on one node); owners'
listings and the active batches on the home node, tolerant of an entry whose object is gone. The batch
driver runs without a worker: the test plays the workers through the job store's transitions, as
tests/unit/test_batch_dispatcher.py does."""
from __future__ import annotations

import io
import json
import uuid

import pytest
import redis

from app.batches import BatchDispatcher, BatchService
from app.files import FileService
from config.settings import Settings
from jobs.batches import BatchStore
from jobs.files import FileStore
from jobs.models import ModelDirectory, model_entry
from jobs.records import JobError, JobEvent, JobResult, JobStatus, Usage
from jobs.shards import ShardedJobStore
from jobs.store import JobStore
from jobs.transition import Ending
from tests.conftest import REDIS_URL

DATABASES = (12, 13, 14)
ENDPOINT = "/v1/chat/completions"


@pytest.fixture
def prefix():
    return f"unit-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def clients(prefix):
    """The three shards' clients; afterwards this test's keys (its prefix) are removed from each, and nothing
    else: these databases may hold someone else's data."""
    base = REDIS_URL.rsplit("/", 1)[0]
    clients = [redis.Redis.from_url(f"{base}/{db}", decode_responses=True) for db in DATABASES]
    yield clients
    for client in clients:
        for key in client.scan_iter(match=f"{prefix}:*"):
            client.delete(key)


@pytest.fixture
def driver(clients, prefix):
    """One API process's stores and batch driver over the three shards (home: the first)."""
    settings = Settings(redis_url=REDIS_URL, redis_prefix=prefix, api_keys=[], job_lease_s=5)
    jobs = ShardedJobStore([JobStore(client, prefix, ttl_s=600) for client in clients])
    models = ModelDirectory(jobs, settings.model_remember_s, configured=model_entry(settings))
    sent = []
    d = BatchDispatcher(settings, BatchStore(jobs, prefix), FileStore(jobs, prefix), jobs, models, sent.append)
    d.sent = sent
    return d


def holders(d: BatchDispatcher, key: str) -> list[int]:
    """The shards that hold `key`."""
    return [i for i, shard in enumerate(d.jobs.shards) if shard.redis.exists(key)]


def request_line(custom_id: str, text: str = "Hi") -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": ENDPOINT,
                       "body": {"messages": [{"role": "user", "content": text}], "max_tokens": 3}})


def upload(d: BatchDispatcher, lines: list[str], owner: str = "owner", shard=None):
    """A file of `lines`; with `shard`, one whose id lands there (others uploaded on the way are deleted)."""
    while True:
        meta = d.files.save_stream(io.BytesIO("\n".join(lines).encode()), "in.jsonl", "batch", owner)
        if shard is None or d.jobs.index_of(meta.id) == shard:
            return meta
        d.files.delete(meta)


def batch_on(d: BatchDispatcher, shard: int, input_file_id: str, owner: str = "owner") -> str:
    """A new batch (validating) whose id lands on `shard`; the others made on the way are dropped."""
    while True:
        batch_id = d.batches.create(owner, input_file_id, ENDPOINT, "24h", None)["id"]
        if d.jobs.index_of(batch_id) == shard:
            return batch_id
        d.batches.deactivate(batch_id)
        d.batches.node(batch_id).delete(d.jobs.keys.batch(batch_id))


def play_workers(d: BatchDispatcher, fail=()) -> None:
    """Run every line job sent so far: completed, or failed for the custom_ids in `fail`."""
    while d.sent:
        record = d.sent.pop(0)
        _, attempt = d.jobs.start(record.id, "w")
        if record.custom_id in fail:
            ending = Ending.failed(JobError(message="boom"))
            events = []
        else:
            usage = Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2)
            ending = Ending.completed(JobResult(text="ok", finish_reason="stop", usage=usage))
            events = [JobEvent(type="delta", text="ok")]
        assert d.jobs.write(attempt, events, ending).applied


def test_a_files_metadata_and_lines_live_on_its_shard_and_its_index_at_home(driver):
    d, keys = driver, driver.jobs.keys
    metas = [upload(d, [f"line {i}", f"more {i}"]) for i in range(12)]
    while {d.jobs.index_of(m.id) for m in metas} != {0, 1, 2}:  # ids are random: 12 miss a shard 0.8 % of the time
        metas.append(upload(d, [f"line {len(metas)}", f"more {len(metas)}"]))
    for i, meta in enumerate(metas):
        shard = d.jobs.index_of(meta.id)
        assert holders(d, keys.file(meta.id)) == [shard]
        assert holders(d, keys.file_lines(meta.id)) == [shard]
        assert d.files.get(meta.id) == meta
        assert list(d.files.iter_lines(meta.id)) == [f"line {i}", f"more {i}"]
    assert holders(d, keys.owner_files("owner")) == [0]
    gone = next(m for m in metas if d.jobs.index_of(m.id) == 2)
    d.files.delete(gone)
    assert holders(d, keys.file(gone.id)) == [] and holders(d, keys.file_lines(gone.id)) == []
    assert gone.id not in d.files.list_ids("owner", 100, None)[0]


def test_owner_listings_span_shards_and_skip_an_entry_whose_object_is_gone(driver):
    d, keys = driver, driver.jobs.keys
    files = FileService(d.files, 1 << 20)
    metas = [upload(d, ["x"]) for _ in range(9)]
    other = upload(d, ["y"], owner="someone-else")
    listed = files.list("owner", 100, None)
    assert {f["id"] for f in listed["data"]} == {m.id for m in metas} and not listed["has_more"]
    assert files.get(other.id, "someone-else")["id"] == other.id
    # A crash between removing a file and removing its index entry: the listing skips the entry.
    lost = next(m for m in metas if d.jobs.index_of(m.id) != 0)
    d.jobs.of(lost.id).redis.delete(keys.file(lost.id))
    assert lost.id not in {f["id"] for f in files.list("owner", 100, None)["data"]}

    service = BatchService(d.batches, d.files)
    batch_ids = [batch_on(d, shard, metas[0].id) for shard in (0, 1, 2, 2, 1)]
    assert holders(d, keys.owner_batches("owner")) == [0] and holders(d, keys.active_batches()) == [0]
    listed = service.list("owner", 100, None)
    assert {b["id"] for b in listed["data"]} == set(batch_ids) and not listed["has_more"]
    for batch_id in batch_ids:
        assert service.get(batch_id, "owner")["status"] == "validating"
    # A batch gone from its shard while still listed and active: skipped, and its next step drops it.
    d.batches.node(batch_ids[-1]).delete(keys.batch(batch_ids[-1]))
    assert {b["id"] for b in service.list("owner", 100, None)["data"]} == set(batch_ids[:-1])
    d.drive(batch_ids[-1])
    assert batch_ids[-1] not in d.batches.active()


@pytest.mark.parametrize("shard", [1, 2])
def test_a_batch_is_fed_and_collected_on_its_shard(driver, shard):
    d, keys = driver, driver.jobs.keys
    lines = [request_line("r0"), "not json", request_line("r1"), request_line("r0"), "",
             request_line("r2"), request_line("r3")]
    meta = upload(d, lines, shard=(shard + 1) % 3)  # the input file on another shard than the batch
    batch_id = batch_on(d, shard, meta.id)
    batch = d.batches.get(batch_id)
    for list_name in ("output_list", "error_list"):
        assert d.jobs.index_of(batch[list_name]) == shard
    assert holders(d, keys.batch(batch_id)) == [shard]
    assert batch_id in d.batches.active()

    assert d.batches.take_lease(batch_id, d.holder, ttl_ms=5000)
    assert holders(d, keys.batch_lease(batch_id)) == [shard]
    d.drive(batch_id)  # validating -> in_progress
    assert d.batches.get(batch_id)["status"] == "in_progress" and d.batches.get(batch_id)["total"] == 6
    d.drive(batch_id)  # feeds every line: four jobs, a bad line and a duplicate custom_id to the error list
    line_ids = d.batches.inflight(batch_id)
    assert len(line_ids) == 4 and sorted(r.id for r in d.sent) == sorted(line_ids)
    assert holders(d, keys.batch_inflight(batch_id)) == [shard]
    assert holders(d, keys.batch_custom_ids(batch_id)) == [shard]
    assert holders(d, keys.file_lines(batch["error_list"])) == [shard]
    for job_id in line_ids:
        assert d.jobs.index_of(job_id) == shard and holders(d, keys.job(job_id)) == [shard]
        assert d.jobs.get(job_id).batch_id == batch_id
    assert sorted(d.jobs.get(j).custom_id for j in line_ids) == ["r0", "r1", "r2", "r3"]
    assert d.batches.get(batch_id)["cursor"] == len(lines) and d.batches.get(batch_id)["failed"] == 2

    play_workers(d, fail={"r2"})
    d.drive(batch_id)  # collects every line, then finalizes
    batch = d.batches.get(batch_id)
    assert batch["status"] == "completed", batch
    assert (batch["completed"], batch["failed"]) == (3, 3)
    assert batch_id not in d.batches.active() and d.batches.inflight(batch_id) == []
    for list_name, field, count in (("output_list", "output_file_id", 3), ("error_list", "error_file_id", 3)):
        file_id = batch[field]
        assert file_id == batch[list_name]
        assert holders(d, keys.file_lines(file_id)) == [shard] and holders(d, keys.file(file_id)) == [shard]
        assert d.files.get(file_id).lines == count
    outputs = [json.loads(line) for line in d.files.iter_lines(batch["output_file_id"])]
    assert sorted(o["custom_id"] for o in outputs) == ["r0", "r1", "r3"]
    assert all(o["response"]["status_code"] == 200 for o in outputs)
    errors = [json.loads(line) for line in d.files.iter_lines(batch["error_file_id"])]
    assert sorted(str(e["custom_id"]) for e in errors) == ["None", "r0", "r2"]
    listed = {f["id"] for f in FileService(d.files, 1 << 20).list("owner", 100, None)["data"]}
    assert {meta.id, batch["output_file_id"], batch["error_file_id"]} <= listed


def test_a_batch_on_another_shard_is_cancelled_with_its_lines(driver):
    d = driver
    meta = upload(d, [request_line(f"r{i}") for i in range(3)])
    batch_id = batch_on(d, 2, meta.id)
    d.drive(batch_id)
    d.drive(batch_id)
    line_ids = d.batches.inflight(batch_id)
    assert len(line_ids) == 3
    BatchService(d.batches, d.files).cancel(batch_id, "owner")
    for _ in range(3):
        d.drive(batch_id)
    batch = d.batches.get(batch_id)
    assert batch["status"] == "cancelled" and batch["completed"] == 0
    assert [d.jobs.get(j).status for j in line_ids] == [JobStatus.CANCELLED] * 3


def test_stores_on_different_nodes_than_the_job_store_are_refused(driver, clients):
    one = ShardedJobStore([JobStore(clients[0], driver.jobs.prefix, ttl_s=600)])
    with pytest.raises(ValueError):
        BatchDispatcher(driver.settings, BatchStore(one, driver.jobs.prefix), driver.files, driver.jobs,
                        driver.models, lambda record: None)
