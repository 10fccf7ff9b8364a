import uuid

import pytest
import torch

from jobs.records import GenerationRequest, JobRecord
from jobs.store import JobStore

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
