import threading
import uuid

import pytest
import torch

from app import create_app
from config.settings import Settings
from jobs.models import model_entry
from jobs.records import GenerationRequest, JobEvent, JobRecord
from jobs.store import JobStore
from jobs.transition import Ending
from tests.conftest import REDIS_URL

# A small greedy request, for tests of the job store that never reach a model.
REQUEST = GenerationRequest(model="m", prompt_token_ids=[1, 2, 3], max_tokens=4, temperature=0.0, top_p=1.0,
                            frequency_penalty=0.0, presence_penalty=0.0, seed=0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matrices: one intra-op thread is faster, and far faster on a busy shared CPU (no spinning)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def prefix(redis_client):
    """A fresh key prefix on the test Redis; its keys are removed afterwards."""
    name = f"unit-{uuid.uuid4().hex[:8]}"
    yield name
    for key in redis_client.scan_iter(match=f"{name}:*"):
        redis_client.delete(key)


@pytest.fixture
def make_store(redis_client):
    """JobStores on the real Redis, each under a fresh key prefix; their keys are removed afterwards."""
    prefixes = []

    def make(lease_s: float) -> JobStore:
        prefixes.append(f"unit-{uuid.uuid4().hex[:8]}")
        return JobStore(redis_client, prefixes[-1], ttl_s=600, lease_s=lease_s)

    yield make
    for prefix in prefixes:
        for key in redis_client.scan_iter(match=f"{prefix}:*"):
            redis_client.delete(key)


def new_job(store: JobStore, queue: str = "q", request: GenerationRequest = REQUEST, age_s: float = 0.0) -> str:
    """A queued background job (created `age_s` ago) on the queue `{prefix}-{queue}`; its id."""
    record = JobRecord.new(request, kind="background", owner="o", queue=f"{store.prefix}-{queue}")
    record.created_at -= age_s
    store.create(record)
    return record.id


@pytest.fixture
def make_client(redis_client):
    """The Flask app (its test client) with a scripted stand-in for the worker: `make(script)` runs
    `script(events)` in a thread for each job, writing through the real job store (ScriptedEvents)."""
    prefixes = []

    def make(script):
        settings = Settings(redis_url=REDIS_URL, redis_prefix=f"unit-{uuid.uuid4().hex[:8]}", api_keys=[],
                            sse_keepalive_s=0.2, request_timeout_s=5)
        prefixes.append(settings.redis_prefix)
        holder = {}

        def enqueue(record):  # the "worker": runs the script in a thread, as a real worker would
            store = holder["app"].extensions["chat_service"].store
            _, attempt = store.start(record.id, "scripted-worker")
            events = ScriptedEvents(store, attempt)
            threading.Thread(target=script, args=(events,), daemon=True).start()

        holder["app"] = create_app(settings, enqueue=enqueue, drive_batches=False)
        # Advertise the model, as a worker's heartbeat would, so requests are routed to "its" queue.
        holder["app"].extensions["chat_service"].store.heartbeat(
            "scripted-worker", {"model_id": settings.served_model_name}, ttl_s=60, model=model_entry(settings))
        return holder["app"].test_client()

    yield make
    for prefix in prefixes:
        for key in redis_client.scan_iter(match=f"{prefix}:*"):
            redis_client.delete(key)


class ScriptedEvents:
    """Writes a job's events the way the worker does (the attempt's transitions), one call at a time."""

    def __init__(self, store, attempt):
        self.store, self.attempt, self.written = store, attempt, 0

    def delta(self, text):
        assert self.store.write(self.attempt, [JobEvent(type="delta", text=text)], acknowledged=self.written).applied
        self.written += 1

    def failed(self, error):
        assert self.store.write(self.attempt, [], Ending.failed(error), acknowledged=self.written).applied

    def completed(self, result):
        assert self.store.write(self.attempt, [], Ending.completed(result), acknowledged=self.written).applied
