"""OpenAI's Batch API with the official SDK, unchanged, against the real stack."""
from __future__ import annotations

import io
import json

import openai
import pytest

from tests.conftest import API_KEYS, wait_until

MODEL = "mistralai/mistral-7b-instruct-v0.2"
FINAL = ("completed", "failed", "expired", "cancelled")


def request_line(custom_id, content, **body):
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": MODEL, "messages": [{"role": "user", "content": content}], **body}})


def upload(client, lines):
    return client.files.create(file=("input.jsonl", io.BytesIO("\n".join(lines).encode())), purpose="batch")


def wait_batch(client, batch_id, timeout=240):
    return wait_until(lambda: (b := client.batches.retrieve(batch_id)).status in FINAL and b, timeout,
                      f"batch {batch_id}", interval=0.5)


def test_batch_of_200_with_bad_lines(client):
    good = {f"req-{i}": request_line(f"req-{i}", f"Question number {i}?", max_tokens=3, temperature=0)
            for i in range(200)}
    bad = [
        "this is not json",
        json.dumps({"custom_id": "bad-temp", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"messages": [{"role": "user", "content": "x"}], "temperature": 7}}),
        json.dumps({"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings", "body": {}}),
        json.dumps({"custom_id": "bad-roles", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"messages": [{"role": "assistant", "content": "x"}]}}),
        request_line("req-0", "duplicate custom_id", max_tokens=1),
    ]
    lines = list(good.values())
    lines[50:50] = bad[:3]
    lines += bad[3:]
    input_file = upload(client, lines)
    assert input_file.purpose == "batch" and input_file.bytes > 0
    batch = client.batches.create(input_file_id=input_file.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"run": "test"})
    assert batch.status in ("validating", "in_progress") and batch.metadata == {"run": "test"}
    done = wait_batch(client, batch.id)
    assert done.status == "completed", done
    assert done.request_counts.total == 205
    assert done.request_counts.completed == 200 and done.request_counts.failed == 5
    assert done.completed_at and done.in_progress_at and done.finalizing_at

    output = [json.loads(line) for line in client.files.content(done.output_file_id).text.splitlines()]
    assert sorted(o["custom_id"] for o in output) == sorted(good)
    for line in output:
        assert line["error"] is None and line["response"]["status_code"] == 200
        body = line["response"]["body"]
        assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] == 3
        assert body["id"] == line["response"]["request_id"]
    # Each output equals the same request made directly (greedy), so lines were not mixed up.
    for line in output[:5]:
        i = int(line["custom_id"].split("-")[1])
        direct = client.chat.completions.create(model=MODEL, max_tokens=3, temperature=0,
                                                messages=[{"role": "user", "content": f"Question number {i}?"}])
        assert line["response"]["body"]["choices"][0]["message"]["content"] == direct.choices[0].message.content

    errors = [json.loads(line) for line in client.files.content(done.error_file_id).text.splitlines()]
    assert len(errors) == 5
    by_id = {e["custom_id"]: e for e in errors}
    assert by_id["bad-temp"]["response"]["body"]["error"]["param"] == "body.temperature"
    assert by_id["bad-url"]["error"]["code"] == "invalid_url"
    assert by_id["bad-roles"]["response"]["status_code"] == 400
    assert by_id["req-0"]["error"]["code"] == "duplicate_custom_id"
    assert by_id[None]["error"]["code"] == "invalid_json_line"

    listed = client.batches.list(limit=100)
    assert batch.id in [b.id for b in listed.data]


def test_cancel_a_running_batch_keeps_partial_results(client):
    lines = [request_line(f"c-{i}", f"Item {i}", max_tokens=40) for i in range(300)]
    batch = client.batches.create(input_file_id=upload(client, lines).id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    wait_until(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 3, 120,
               "some lines to complete", interval=0.3)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = wait_batch(client, batch.id)
    assert done.status == "cancelled" and done.cancelled_at
    assert 3 <= done.request_counts.completed < 300
    output = client.files.content(done.output_file_id).text.splitlines()
    assert len(output) == done.request_counts.completed


def test_other_keys_cannot_see_files_or_batches(client, stack):
    input_file = upload(client, [request_line("x", "hi", max_tokens=1)])
    batch = client.batches.create(input_file_id=input_file.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    other = openai.OpenAI(base_url=stack.base_url + "/v1", api_key=API_KEYS[1], max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.files.retrieve(input_file.id)
    with pytest.raises(openai.NotFoundError):
        other.files.content(input_file.id)
    with pytest.raises(openai.NotFoundError):
        other.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        other.batches.cancel(batch.id)
    with pytest.raises(openai.NotFoundError):  # nor start a batch on someone else's file
        other.batches.create(input_file_id=input_file.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert batch.id not in [b.id for b in other.batches.list().data]
    wait_batch(client, batch.id)


def test_batch_request_validation(client):
    input_file = upload(client, [request_line("x", "hi", max_tokens=1)])
    with pytest.raises(openai.BadRequestError) as info:
        client.batches.create(input_file_id=input_file.id, endpoint="/v1/completions", completion_window="24h")
    assert info.value.body["param"] == "endpoint"
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=input_file.id, endpoint="/v1/chat/completions", completion_window="1h")
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("a.jsonl", io.BytesIO(b"{}")), purpose="fine-tune")
    deleted = client.files.delete(input_file.id)
    assert deleted.deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(input_file.id)
