"""A fresh start: the API answers before any worker has loaded its model (on a GPU, a minute or more).

The model this deployment is configured to serve (the API's own SERVED_MODEL_NAME and aliases, the same
settings as its workers) is known from the first request: its requests wait in its queue for the first
worker, streamed, non-stream, background and batch alike. Where a request cannot wait (its queue is full),
it gets a 503 with Retry-After. Never a 404; that stays for models nobody configured or served. `/ready`
says 503 until a worker is live.

Starts from an empty Redis: a key prefix and queues of its own, with nothing in them.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import io
import json

import httpx
import openai
import pytest
from openai import OpenAI

from scripts.stack import Stack, chunk_text, free_port, stack_env, wait_until

MODEL = "mistralai/mistral-7b-instruct-v0.2"
ALIAS = "mistralai/Mistral-7B-Instruct-v0.2"  # the Hugging Face id
HELLO = [{"role": "user", "content": "Say hello"}]
ASK = {"messages": HELLO, "max_tokens": 8, "temperature": 0}


@pytest.fixture
def fresh(tmp_path):
    """The API with no worker yet, on an empty Redis; and a second API process whose queue cap (one job) the
    waiting requests fill."""
    stack = Stack(stack_env(), tmp_path)
    assert stack.owned_keys() == []
    capped_port = free_port()
    capped_url = f"http://127.0.0.1:{capped_port}"
    stack.start_api()
    stack.start_api("api-capped", port=capped_port, extra_env={"MAX_QUEUED_JOBS": "1"})
    try:
        stack.wait_api()
        stack.wait_api(capped_url)
        yield stack, capped_url
    finally:
        stack.stop_all()
        stack.cleanup_redis()


@pytest.fixture
def pool():
    """Threads for the requests that wait. Not waited for at the end: a failing test must not hang on a stream
    that waits for a worker that never comes (stopping the stack ends them)."""
    executor = concurrent.futures.ThreadPoolExecutor(4)
    yield executor
    executor.shutdown(wait=False, cancel_futures=True)


def joined(chunks) -> tuple[str, str]:
    """(text, finish reason) of a stream's chunks."""
    text, finish = "", None
    for chunk in chunks:
        if chunk.choices:
            text += chunk_text(chunk)
            finish = chunk.choices[0].finish_reason or finish
    return text, finish


async def async_requests(stack: Stack):
    """With the async SDK: a non-stream request by the alias, a stream by the id."""
    client = stack.sdk("unused", asynchronous=True)

    async def streamed():
        stream = await client.chat.completions.create(model=MODEL, stream=True, **ASK)
        return joined([chunk async for chunk in stream])

    return await asyncio.gather(client.chat.completions.create(model=ALIAS.upper(), **ASK), streamed())


def submit_batch(client: OpenAI) -> str:
    lines = [json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": model, **ASK}}) for i, model in enumerate((MODEL, ALIAS))]
    upload = client.files.create(file=("input.jsonl", io.BytesIO("\n".join(lines).encode())), purpose="batch")
    return client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                 completion_window="24h").id


def test_requests_before_the_first_worker_wait_for_it(fresh, pool):
    stack, capped_url = fresh
    client = stack.sdk("unused")
    ready = httpx.get(stack.base_url + "/ready")
    assert ready.status_code == 503 and ready.json()["error"]["code"] == "no_workers"

    # Requests of every kind, by the id and by the alias, sent before any worker exists.
    waiting = [
        pool.submit(client.chat.completions.create, model=MODEL, **ASK),
        pool.submit(lambda: joined(client.chat.completions.create(model=ALIAS, stream=True, **ASK))),
        pool.submit(asyncio.run, async_requests(stack)),
    ]
    background = client.chat.completions.with_raw_response.create(
        model=ALIAS, extra_body={"background": True}, **ASK).http_response
    assert background.status_code == 202 and background.json()["status"] == "queued"
    batch_id = submit_batch(client)

    done, _ = concurrent.futures.wait(waiting, timeout=3)
    assert not done, [f.exception() or f.result() for f in done]  # they wait (streams get keep-alives)
    assert httpx.get(stack.base_url + "/ready").status_code == 503

    # Meanwhile the configured model is listed and known; a model nobody serves is still unknown.
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(ALIAS).id == MODEL
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="gpt-4o", **ASK)
    assert (unknown.value.code, unknown.value.param) == ("model_not_found", "model")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")

    # Where a request cannot wait, it is told to come back, not that the model does not exist.
    wait_until(lambda: stack.redis.llen(stack.env["INTERACTIVE_QUEUE"]) >= 1, 10, "jobs in the queue")
    with pytest.raises(openai.APIStatusError) as full:
        stack.sdk("unused", base_url=capped_url).chat.completions.create(model=MODEL, **ASK)
    assert (full.value.status_code, full.value.type) == (503, "service_unavailable")
    assert int(full.value.response.headers["Retry-After"]) >= 1

    stack.start_worker()
    stack.wait_ready()
    plain = waiting[0].result(timeout=120)
    stream_text, stream_finish = waiting[1].result(timeout=120)
    async_plain, (async_text, async_finish) = waiting[2].result(timeout=120)

    for completion in (plain, async_plain):
        assert completion.model == MODEL and completion.choices[0].finish_reason in ("length", "stop")
        assert completion.usage.completion_tokens >= 1
    assert stream_finish in ("length", "stop") and async_finish in ("length", "stop")
    assert stream_text and async_text

    job_url = f"{stack.base_url}/v1/chat/completions/{background.json()['id']}"
    wait_until(lambda: httpx.get(job_url).json()["status"] == "completed", 60, "the background job")
    batch = wait_until(lambda: (b := client.batches.retrieve(batch_id)).status == "completed" and b, 120,
                       "the batch", interval=0.5)
    assert (batch.request_counts.completed, batch.request_counts.failed) == (2, 0)
