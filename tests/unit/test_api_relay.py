"""The API layer alone: the Flask app with a scripted stand-in for the worker (it publishes events through
the real JobStore on a real Redis, as the worker's publisher does). Covers worker failures reaching the client in OpenAI's shape,
mid-stream and not, which the real tiny-model worker cannot be made to produce on demand."""
from __future__ import annotations

import json
import time
import uuid

import pytest

from app import create_app
from config.settings import Settings
from jobs.models import model_entry
from jobs.records import JobError, JobResult, JobStatus, Usage
from tests.conftest import REDIS_URL

BODY = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}


def fails_after_one_delta(events):
    events.delta("Hel")
    events.failed(JobError(message="CUDA error: out of memory", code="generation_failed"))


def test_worker_error_mid_stream_is_an_error_event_then_the_end(make_client):
    client = make_client(fails_after_one_delta)
    response = client.post("/v1/chat/completions", json={**BODY, "stream": True})
    assert response.status_code == 200
    data = [line[6:] for line in response.get_data(as_text=True).split("\n") if line.startswith("data: ")]
    assert json.loads(data[1])["choices"][0]["delta"]["content"] == "Hel"
    error = json.loads(data[-1])["error"]
    assert error["message"] == "CUDA error: out of memory" and error["code"] == "generation_failed"
    assert "[DONE]" not in data


def test_worker_error_non_stream_is_500_in_openai_shape_not_retried(make_client):
    client = make_client(fails_after_one_delta)
    response = client.post("/v1/chat/completions", json=BODY)
    assert response.status_code == 500
    assert response.json["error"]["code"] == "generation_failed"
    assert response.headers["x-should-retry"] == "false"


def test_keepalive_comments_while_waiting(make_client):
    def slow(events):
        time.sleep(0.7)
        usage = Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2)
        events.delta("x")
        events.completed(JobResult(text="x", finish_reason="stop", usage=usage))

    response = make_client(slow).post("/v1/chat/completions", json={**BODY, "stream": True})
    text = response.get_data(as_text=True)
    assert ": keep-alive" in text and text.rstrip().endswith("data: [DONE]")


def test_non_stream_timeout_is_504_and_cancels(make_client, redis_client):
    client = make_client(lambda events: None)  # a worker that takes the job and never answers
    response = client.post("/v1/chat/completions", json=BODY)
    assert response.status_code == 504 and response.json["error"]["code"] == "timeout"
    job_id = [k for k in redis_client.scan_iter(match="unit-*:job:*:cancel")]
    assert job_id, "the abandoned job was not cancelled"


@pytest.mark.parametrize("background", [False, True])
def test_a_job_that_could_not_be_sent_is_a_503_and_never_runs(redis_client, background):
    """Redis went away between the job record and the send: the client gets a 503 (and retries), and the
    record is withdrawn, so neither the lost-delivery reaper nor anyone else runs it behind its back."""
    from kombu.exceptions import OperationalError

    def enqueue(record):
        raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    settings = Settings(redis_url=REDIS_URL, redis_prefix=f"unit-{uuid.uuid4().hex[:8]}", api_keys=[])
    app = create_app(settings, enqueue=enqueue, drive_batches=False)
    store = app.extensions["chat_service"].store
    store.heartbeat("w", {"model_id": settings.served_model_name}, ttl_s=60, model=model_entry(settings))
    try:
        response = app.test_client().post("/v1/chat/completions", json={**BODY, "background": background})
        assert response.status_code == 503 and response.headers["Retry-After"]
        assert response.json["error"]["code"] == "queue_unavailable"
        job_ids = [key.split(":")[2] for key in redis_client.scan_iter(match=f"{settings.redis_prefix}:job:*")
                   if key.count(":") == 2]  # the record itself, not its event log
        assert len(job_ids) == 1
        record = store.get(job_ids[0])
        assert record.status == JobStatus.FAILED and record.error.code == "queue_unavailable"
        assert redis_client.zcard(store.keys.queued()) == 0  # nothing left for the lost-delivery reaper
    finally:
        for key in redis_client.scan_iter(match=f"{settings.redis_prefix}:*"):
            redis_client.delete(key)
