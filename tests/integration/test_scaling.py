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


def test_pools_per_model(tmp_path):
    """A second pool serves another model from its own queues; /v1/models lists models with live workers,
    requests are routed to their model's pool, and a model nobody serves is a 404."""
    stack = Stack(stack_env(HEARTBEAT_INTERVAL_S="0.5", HEARTBEAT_TTL_S="2"), tmp_path)
    other = {"SERVED_MODEL_NAME": "acme/tiny-chat", "SERVED_MODEL_ALIASES": "",
             "INTERACTIVE_QUEUE": stack.env["INTERACTIVE_QUEUE"] + "-tiny-chat",
             "BATCH_QUEUE": stack.env["BATCH_QUEUE"] + "-tiny-chat"}
    stack.start_worker("mistral-pool")
    stack.start_worker("tiny-chat-pool", extra_env=other)
    stack.start_api()
    try:
        stack.wait_ready()
        stack.wait_workers(2)
        listed = sorted(m["id"] for m in httpx.get(stack.base_url + "/v1/models").json()["data"])
        assert listed == ["acme/tiny-chat", MODEL]
        for model, pool in ((MODEL, "mistral-pool"), ("ACME/Tiny-Chat", "tiny-chat-pool")):
            response = httpx.post(stack.base_url + "/v1/chat/completions", timeout=60, json={
                "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
            assert response.status_code == 200
            assert stack.job(response.json()["id"])["worker"].startswith(pool + "-")
        unknown = httpx.post(stack.base_url + "/v1/chat/completions", timeout=60, json={
            "model": "acme/none", "messages": [{"role": "user", "content": "hi"}]})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
        stack.stop("tiny-chat-pool")
        from scripts.stack import wait_until
        wait_until(lambda: [m["id"] for m in httpx.get(stack.base_url + "/v1/models").json()["data"]] == [MODEL],
                   15, "the stopped pool to leave /v1/models")
    finally:
        stack.stop_all()
        stack.cleanup_redis()
