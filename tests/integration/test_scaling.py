"""Horizontal scaling on one machine: two worker processes and two API processes behind one Redis. A load
of concurrent streams spreads over both workers; stopping one worker leaves the service answering."""
from __future__ import annotations

import collections
import concurrent.futures
import json

import httpx
import pytest

from scripts.stack import Stack, free_port, stack_env

MODEL = "mistralai/mistral-7b-instruct-v0.2"


@pytest.fixture
def two_by_two(tmp_path):
    stack = Stack(stack_env(), tmp_path)
    stack.start_worker("worker-a", concurrency=4)
    stack.start_worker("worker-b", concurrency=4)
    second_port = free_port()
    stack.start_api("api")
    stack.start_api("api-2", port=second_port)
    stack.wait_ready()
    stack.wait_workers(2)
    yield stack, [stack.base_url, f"http://127.0.0.1:{second_port}"]
    stack.stop_all()
    stack.cleanup_redis()


def stream(base_url: str, i: int) -> str:
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"Request {i}"}], "max_tokens": 60,
            "stream": True}
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return json.loads(lines[0][6:])["id"]


def test_load_spreads_over_both_workers_and_survives_one_stopping(two_by_two):
    stack, api_urls = two_by_two
    with concurrent.futures.ThreadPoolExecutor(16) as pool:  # round-robin over the two API processes
        job_ids = list(pool.map(lambda i: stream(api_urls[i % 2], i), range(32)))
    split = collections.Counter(stack.job(j)["worker"].split("@")[0].rsplit("-", 1)[0] for j in job_ids)
    print(f"\n32 concurrent streams over 2 API processes -> jobs per worker: {dict(split)}")
    assert set(split) == {"worker-a", "worker-b"}
    assert min(split.values()) >= 4  # both take a real share

    stack.stop("worker-b")  # a graceful stop: it finishes what it holds and leaves
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        after = list(pool.map(lambda i: stream(api_urls[i % 2], i), range(8)))
    workers_after = collections.Counter(stack.job(j)["worker"].split("@")[0].rsplit("-", 1)[0] for j in after)
    print(f"after stopping worker-b: {len(after)} streams answered, by {dict(workers_after)}")
    assert set(workers_after) == {"worker-a"}
    models = httpx.get(api_urls[1] + "/v1/models").json()["data"]
    assert [m["id"] for m in models] == [MODEL]
