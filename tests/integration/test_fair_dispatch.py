"""Fair dispatch on the real stack (a Celery worker holding the tiny model, the API under gunicorn over HTTP,
the official openai SDK as client): key A floods the queue with background jobs, then key B streams one
request; B is served while most of A's backlog still waits (in A's own queue, not in Celery's), and every
one of A's jobs completes, each started once. The parked jobs show in /metrics by A's fingerprint only.

Starts from an empty Redis: a key prefix and queues of its own, with nothing in them."""
from __future__ import annotations

import concurrent.futures
import time

import httpx
import pytest

from app.auth import owner_of
from scripts.stack import Stack, chunk_text, stack_env, wait_until

MODEL = "mistralai/mistral-7b-instruct-v0.2"
KEY_A, KEY_B = "fair-key-a", "fair-key-b"
FLOOD = 40
SLOTS = 2  # the worker's concurrency: a backlog of 40 jobs takes a while to drain


@pytest.fixture(scope="module")
def fair_stack(tmp_path_factory):
    stack = Stack(stack_env(api_keys=(KEY_A, KEY_B), MAX_NUM_SEQS=str(SLOTS)), tmp_path_factory.mktemp("fair"))
    assert stack.owned_keys() == []
    stack.start_worker(concurrency=SLOTS)
    stack.start_api()
    with stack.serving():
        yield stack


def submit_background(client, i: int) -> str:
    response = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": f"Backlog job {i}"}], max_tokens=48, temperature=0.7,
        seed=i, extra_body={"background": True})
    assert response.http_response.status_code == 202
    return response.http_response.json()["id"]


def statuses(client, job_ids) -> list[str]:
    return [client.get(f"/chat/completions/{job_id}", cast_to=object)["status"] for job_id in job_ids]


def parked_series(stack) -> dict[str, float]:
    """llmq_parked_jobs by owner label, as /metrics shows it now."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(stack.base_url + "/metrics", timeout=10).text
    assert KEY_A not in text and KEY_B not in text
    return {s.labels["owner"]: s.value for family in text_string_to_metric_families(text)
            if family.name == "llmq_parked_jobs" for s in family.samples}


def test_a_key_behind_a_flood_is_served_before_the_flood_drains(fair_stack):
    a, b = fair_stack.sdk(KEY_A, timeout=60), fair_stack.sdk(KEY_B, timeout=120)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        flood = list(pool.map(lambda i: submit_background(a, i), range(FLOOD)))
    assert parked_series(fair_stack).get(owner_of(KEY_A), 0) > 0

    started = time.perf_counter()
    text, first_token_s = "", None
    for chunk in b.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}],
                                           max_tokens=8, temperature=0, stream=True):
        if first_token_s is None and chunk_text(chunk):
            first_token_s = time.perf_counter() - started
        text += chunk_text(chunk)
    a_at_b_done = statuses(a, flood)
    assert text and first_token_s is not None
    # Served in its turn: most of A's backlog has not even started (FIFO would have put B behind all of it).
    assert a_at_b_done.count("queued") >= FLOOD // 2, a_at_b_done

    wait_until(lambda: all(s == "completed" for s in statuses(a, flood)), 240, "all of A's jobs", interval=1)
    records = [fair_stack.job(job_id) for job_id in flood]
    assert all(r["attempts"] == "1" and "fair" not in r for r in records)
    assert parked_series(fair_stack) == {}
    assert fair_stack.redis.llen(fair_stack.env["INTERACTIVE_QUEUE"]) == 0
