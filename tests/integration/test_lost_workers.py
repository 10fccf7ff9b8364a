"""Jobs of a worker that is lost (its machine gone) or hung (alive, its engine not stepping), against the real
stack: two workers holding two jobs each, leases of 2 s, the official SDK reading the streams.

- Cancelling a job that a lost worker's lapsed lease put back on the queue (its log already has events)
  answers 200 and `cancelled`, and its stream ends with the cancel (issue 13, case 1: it answered 500 and the
  job stayed queued, because the API ended it with event seq 0).
"""
from __future__ import annotations

import httpx
import openai
import pytest

from scripts.stack import Stack, chunk_text, job_events_stream, stack_env, wait_until

MODEL = "mistralai/mistral-7b-instruct-v0.2"
KEY = "lost-workers-key"
LONG = 3000  # tokens: tens of seconds of generation here, far longer than the test needs


@pytest.fixture
def stack(tmp_path):
    env = stack_env(api_keys=(KEY,), JOB_LEASE_S="2", REAPER_INTERVAL_S="0.5", HEARTBEAT_TTL_S="4",
                    STREAM_INTERVAL_S="0.01")
    s = Stack(env, tmp_path)
    s.start_api()
    s.start_worker("worker-a", concurrency=2)
    s.start_worker("worker-b", concurrency=2)
    with s.serving():
        s.wait_workers(2)
        yield s


def submit(stack: Stack, **body) -> str:
    response = httpx.post(stack.base_url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": MODEL, "messages": [{"role": "user", "content": "A long story."}],
                                "background": True, "max_tokens": LONG, **body}, timeout=30)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def cancel(stack: Stack, job_id: str) -> httpx.Response:
    return httpx.post(f"{stack.base_url}/v1/chat/completions/{job_id}/cancel",
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30)


def log_length(stack: Stack, job_id: str) -> int:
    return stack.redis.xlen(f"{stack.prefix}:job:{job_id}:log")


def read_stream(client: openai.OpenAI, job_id: str) -> tuple[str, str]:
    """The job's text as the SDK streams it, and how the stream ended ("done" or the error's code)."""
    text = ""
    try:
        for chunk in job_events_stream(client, job_id):
            text += chunk_text(chunk)
    except openai.APIError as exc:
        return text, (exc.body or {}).get("code", str(exc))
    return text, "done"


def test_cancelling_what_a_lost_workers_leases_requeued(stack):
    jobs = [submit(stack, seed=i) for i in range(4)]
    wait_until(lambda: all(stack.job(j).get("status") == "in_progress" and log_length(stack, j) > 0 for j in jobs),
               60, "all four jobs streaming")
    lost = [j for j in jobs if stack.worker_of(j) == "worker-a"]
    assert len(lost) == 2  # two jobs on each worker
    stack.kill("worker-a")  # its whole process group: the machine is gone
    # Worker b's reaper puts them back on the queue; b is busy with its own two, so they wait there.
    wait_until(lambda: all(stack.job(j)["status"] == "queued" for j in lost), 30, "the lost jobs requeued")
    client = stack.sdk(KEY)
    for job_id in lost:
        events_before = log_length(stack, job_id)
        response = cancel(stack, job_id)
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "cancelled"
        text, ending = read_stream(client, job_id)
        assert ending == "job_cancelled" and text  # the deltas of the lost attempt, then the cancel
        assert log_length(stack, job_id) == events_before + 1
    for job_id in jobs:
        if job_id not in lost:
            assert cancel(stack, job_id).status_code == 200
    wait_until(lambda: all(stack.job(j)["status"] == "cancelled" for j in jobs), 60, "every job cancelled")
