"""A stream that goes quiet after its first delta gets keep-alives, and every client reads on through them.

A running stream goes quiet whenever its job makes no progress for a while: a lost worker's job waiting for
its lease to lapse, a Redis outage, a queue behind a burst. Here the job's worker is frozen (SIGSTOP) right
after the first delta, for several keep-alive intervals (the test stack sends one every 0.5 s), and then
goes on. The official SDK keeps the last `id:` across events, as the SSE spec says, and dispatches an event
at every blank line once it holds one: a keep-alive that ends with a blank line would reach it as an event
with empty data, and `json.loads("")` would end the user's stream.
"""
from __future__ import annotations

import asyncio
import json
import time

import httpx

from scripts.stack import chunk_text, iter_sse
from tests.conftest import API_KEYS

MODEL = "mistralai/mistral-7b-instruct-v0.2"
# Greedy, the tiny random model never chooses EOS: the job is still running when its worker is frozen.
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 1000, "temperature": 0}
IDLE_S = 3.0  # six keep-alive intervals of the test stack


def hold_idle(stack, job_id: str) -> None:
    """Freeze the job's worker for IDLE_S: meanwhile its stream gets nothing but keep-alives."""
    with stack.frozen(stack.worker_of(job_id)):
        time.sleep(IDLE_S)
        assert stack.job(job_id)["status"] == "in_progress"  # the stream really was held open, not done


def final_text(stack, job_id: str) -> str:
    return json.loads(stack.job(job_id)["result"])["text"]


def test_sdk_sync_stream_reads_on_through_keepalives_after_its_first_delta(stack, client):
    text, job_id = "", None
    for chunk in client.chat.completions.create(stream=True, **BODY):
        if chunk_text(chunk) and job_id is None:
            job_id = chunk.id
            hold_idle(stack, job_id)  # not reading meanwhile: the keep-alives wait in the socket
        text += chunk_text(chunk)
    assert job_id is not None and text == final_text(stack, job_id)


def test_sdk_async_stream_reads_on_through_keepalives_after_its_first_delta(stack):
    async def read() -> tuple[str, str]:
        text, job_id = "", None
        async with stack.sdk(API_KEYS[0], asynchronous=True) as aclient:
            async for chunk in await aclient.chat.completions.create(stream=True, **BODY):
                if chunk_text(chunk) and job_id is None:
                    job_id = chunk.id
                    hold_idle(stack, job_id)  # blocks the event loop: nothing is read meanwhile
                text += chunk_text(chunk)
        return text, job_id

    text, job_id = asyncio.run(read())
    assert job_id is not None and text == final_text(stack, job_id)


def test_keepalives_are_comment_lines_that_never_end_an_event(stack):
    """The raw lines: keep-alives came after the first delta, and every blank line ends an event with data
    (so no client, whatever it keeps across events, dispatches one for a keep-alive)."""
    lines, job_id = [], None
    with httpx.stream("POST", stack.base_url + "/v1/chat/completions", json={**BODY, "stream": True},
                      headers={"Authorization": f"Bearer {API_KEYS[0]}"}, timeout=120) as response:
        for line in response.iter_lines():
            if job_id is None and lines and lines[-1].startswith("id: "):  # the first delta's data line
                job_id = json.loads(line[len("data: "):])["id"]
                hold_idle(stack, job_id)
            lines.append(line)
    first_delta = next(i for i, line in enumerate(lines) if line.startswith("id: "))
    assert lines[first_delta:].count(": keep-alive") >= 2
    event: list[str] = []
    for line in lines:
        if line:
            event.append(line)
            continue
        assert any(part.startswith("data: ") for part in event), f"a blank line ends an event without data: {event}"
        event = []
    text = "".join(payload["choices"][0]["delta"].get("content", "") for _, payload in iter_sse(lines)
                   if payload != "[DONE]" and payload["choices"])
    assert lines[-2:] == ["data: [DONE]", ""] and text == final_text(stack, job_id)
