"""What the integration tests that disrupt the whole service share: its client side (a well-behaved client's
submit, the three stream readers, a background job's polling), a stack to run it on, and the mixed workload of
tests/integration/test_shards.py (a shard restarted) and tests/integration/test_sentinel_failover.py (a
Sentinel failover) with its checks. tests/integration/test_chaos.py uses the client side and the stack.

The workload: background jobs submitted (post_with_retry) and polled through the API until they are over
(poll_until_over), and streams read a third each with the official SDK's sync client, its async client (which
read a broken stream again from the start) and as raw lines (which resume after their last event id), while
`disrupt` does its worst in a thread of its own beside them. Then every job is checked as test_chaos.py checks
it: ended exactly once (completed), its event log contiguous with one final event, every stream's text (and
every poll's result) equal to its job's final text, none lost."""
from __future__ import annotations

import asyncio
import collections
import json
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import httpx
import openai

from scripts.stack import Stack, chunk_text, iter_sse, job_events_stream, wait_until

MODEL = "mistralai/mistral-7b-instruct-v0.2"
KEY = "chaos-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
TERMINAL = ("completed", "failed", "cancelled")
READERS = ("sdk", "async sdk", "raw lines")  # stream i is read by READERS[i % 3]


def post_with_retry(client: httpx.Client, body: dict, deadline: float) -> httpx.Response:
    """What a well-behaved client does: retry 503/429 after Retry-After (and connection errors)."""
    while True:
        try:
            response = client.post("/v1/chat/completions", json=body, headers=AUTH)
            if response.status_code not in (429, 503):
                return response
            pause = float(response.headers.get("Retry-After", "1"))
        except httpx.TransportError:
            pause = 1.0
        if time.monotonic() > deadline:
            raise TimeoutError("could not submit before the deadline")
        time.sleep(min(pause, 2.0))


def read_stream(base_url: str, body: dict, deadline: float, seen: dict) -> None:
    """Stream a completion as raw lines; on an interrupted stream, resume from the last event id. Fills `seen`
    with what the client saw: job id, text and the event ids."""
    seen.update(id=None, text="", ids=[], done=False)
    with httpx.Client(base_url=base_url, timeout=60) as client:
        response_cm = None
        while not seen["done"] and time.monotonic() < deadline:
            try:
                if seen["id"] is None:
                    response_cm = client.stream("POST", "/v1/chat/completions", json={**body, "stream": True},
                                                headers=AUTH)
                else:
                    headers = {**AUTH, "Last-Event-ID": str(seen["ids"][-1] if seen["ids"] else -1)}
                    response_cm = client.stream("GET", f"/v1/chat/completions/{seen['id']}/events", headers=headers)
                with response_cm as response:
                    if response.status_code in (429, 503):
                        time.sleep(1)
                        continue
                    for event_id, payload in iter_sse(response.iter_lines()):
                        if payload == "[DONE]":
                            seen["done"] = True
                            break
                        if "error" in payload:
                            break  # interrupted: resume
                        seen["id"] = seen["id"] or payload["id"]
                        if event_id is not None:
                            seen["ids"].append(event_id)
                            seen["text"] += payload["choices"][0]["delta"].get("content", "")
            except httpx.TransportError:
                time.sleep(0.5)


# The SDK retries a 503 or 429 after its Retry-After, and a lost connection, by itself.
SDK_RETRIES = 10


def read_stream_with_sdk(stack, body: dict, deadline: float, seen: dict) -> None:
    """Stream a completion with the official SDK's sync client. A stream that breaks is read again from the
    start (`…/events`: the SDK shows no event ids to resume after), and that read's text replaces what was
    read. Fills `seen` with the job id and the text (no event ids)."""
    seen.update(id=None, text="", ids=None, done=False)
    client = stack.sdk(KEY, max_retries=SDK_RETRIES, timeout=60)
    while not seen["done"] and time.monotonic() < deadline:
        try:
            stream = (client.chat.completions.create(stream=True, **body) if seen["id"] is None
                      else job_events_stream(client, seen["id"]))
            seen["text"] = ""
            for chunk in stream:
                seen["id"] = chunk.id
                seen["text"] += chunk_text(chunk)
            seen["done"] = True
        except openai.APIError:  # a lost connection or a 5xx past the retries, or an error event
            time.sleep(0.5)


async def read_stream_with_async_sdk(stack, body: dict, deadline: float, seen: dict) -> None:
    """The same with the SDK's async client."""
    seen.update(id=None, text="", ids=None, done=False)
    async with stack.sdk(KEY, asynchronous=True, max_retries=SDK_RETRIES, timeout=60) as client:
        while not seen["done"] and time.monotonic() < deadline:
            try:
                stream = await (client.chat.completions.create(stream=True, **body) if seen["id"] is None
                                else job_events_stream(client, seen["id"]))
                seen["text"] = ""
                async for chunk in stream:
                    seen["id"] = chunk.id
                    seen["text"] += chunk_text(chunk)
                seen["done"] = True
            except openai.APIError:
                await asyncio.sleep(0.5)


def read_a_stream(stack: Stack, i: int, body: dict, deadline: float, seen: dict,
                  errors: collections.Counter) -> None:
    """Read stream `i` with its reader (READERS[i % 3], noted in `seen`). A reader that dies is a stream
    mismatch: what it raised is counted in `errors` (to say why with the figures), and raised again."""
    seen["reader"] = READERS[i % 3]
    try:
        if i % 3 == 0:
            read_stream_with_sdk(stack, body, deadline, seen)
        elif i % 3 == 1:
            asyncio.run(read_stream_with_async_sdk(stack, body, deadline, seen))
        else:
            read_stream(stack.base_url, body, deadline, seen)
    except Exception as exc:
        errors[repr(exc)[:160]] += 1
        raise


@contextmanager
def running_stack(env: dict, log_dir: Path, n_workers: int, concurrency: int = 8):
    """For a fixture: a Stack on `env` with `n_workers` workers (worker0, worker1, …) and one API process,
    ready; however it ends, every process stopped."""
    stack = Stack(env, log_dir)
    try:
        for i in range(n_workers):
            stack.start_worker(f"worker{i}", concurrency=concurrency)
        stack.start_api()
        stack.wait_ready()
        stack.wait_workers(n_workers)
        yield stack
    finally:
        stack.stop_all()


def poll_until_over(base_url: str, job_id: str, deadline: float, seen: dict) -> None:
    """GET the background job until it is over, riding out 503s and lost connections; keeps the last answer."""
    with httpx.Client(base_url=base_url, timeout=30) as client:
        while time.monotonic() < deadline:
            try:
                response = client.get(f"/v1/chat/completions/{job_id}", headers=AUTH)
            except httpx.TransportError:
                seen["errors"] += 1
                time.sleep(0.5)
                continue
            if response.status_code == 200:
                body = response.json()
                if body["status"] in (*TERMINAL, "expired"):
                    seen[job_id] = body
                    return
            else:
                seen["errors"] += 1
            time.sleep(0.3)


def stream_mismatch(stack: Stack, seen: dict, where: Callable[[str | None], str] | None = None) -> str | None:
    """None for a stream read to its end with its job's final text (and, read as raw lines, event ids
    contiguous from 0); else what went wrong, for the report (`where`: where the job is, e.g. its shard)."""
    record = stack.job(seen["id"]) if seen.get("id") else {}
    final = json.loads(record["result"])["text"] if record.get("result") else None
    ids = seen.get("ids")
    ids_ok = ids is None or ids == list(range(len(ids)))
    if seen.get("done") and seen["text"] == final and ids_ok:
        return None
    text = seen.get("text", "")
    return (f"{seen.get('reader')} stream {seen.get('id')}" + ("" if where is None else f" ({where(seen.get('id'))})")
            + f": done={seen.get('done')}, read {len(text)} chars, final {None if final is None else len(final)}, "
            f"equal for the first {len(os.path.commonprefix([text, final or '']))}"
            + ("" if ids is None else f", event ids contiguous={ids_ok} ({len(ids)}, duplicates "
                                      f"{len(ids) - len(set(ids))})")
            + f", status {record.get('status')}, attempts {record.get('attempts')}")


def check_jobs(stack: Stack, all_ids: list[str], accepted: list[str], polls: dict) -> dict:
    """Every job as test_chaos.py checks it: `lost` (not completed, or no final event), `duplicated` (not one
    final `done`, its log's seqs not contiguous from 0, or its log's text not its result's), `poll_mismatch` (a
    background job whose last poll was not its completed text); `resumed`: the completed jobs that took more
    than one attempt; `failures`: (status, error) of the lost ones."""
    lost = duplicated = poll_mismatch = 0
    resumed: list[str] = []
    failures = collections.Counter()
    for job_id in all_ids:
        record = stack.job(job_id)
        log = stack.job_redis(job_id).xrange(f"{stack.prefix}:job:{job_id}:log")
        events = [json.loads(f["e"]) for _, f in log]
        finals = [e for e in events if e["type"] != "delta"]
        text = "".join(e.get("text", "") for e in events if e["type"] == "delta")
        if record.get("status") != "completed" or not finals:
            lost += 1
            failures[(record.get("status"), (record.get("error") or "")[:160])] += 1
            continue
        if int(record.get("attempts", 1)) > 1:
            resumed.append(job_id)
        if (len(finals) != 1 or finals[0]["type"] != "done"
                or [e["seq"] for e in events] != list(range(len(events)))
                or text != json.loads(record["result"])["text"]):
            duplicated += 1
        if job_id in accepted:
            answer = polls.get(job_id)
            if answer is None or answer["status"] != "completed" or \
                    answer["result"]["choices"][0]["message"]["content"] != text:
                poll_mismatch += 1
    return dict(lost=lost, duplicated=duplicated, poll_mismatch=poll_mismatch, resumed=resumed, failures=failures)


def run_mixed_load(stack: Stack, deadline: float, *, n_background: int, n_streams: int, stream_tokens: int,
                   disrupt: Callable[[list[dict], list[str]], None] | None = None,
                   where: Callable[[str | None], str] | None = None) -> dict:
    """`n_background` background jobs (polled) and `n_streams` streams of `stream_tokens` tokens (SDK sync, SDK
    async, raw lines) at once, `disrupt(streams, accepted)` in a thread of its own beside them (`streams`: each
    stream's `seen` as its reader fills it; `accepted`: the background jobs' ids so far); every job awaited,
    then checked (check_jobs, stream_mismatch). Returns the figures."""
    accepted: list[str] = []
    streams: list[dict] = []
    polls: dict = collections.Counter()
    stream_errors = collections.Counter()

    def submit_background():
        with httpx.Client(base_url=stack.base_url, timeout=30) as client:
            for i in range(n_background):
                body = {"model": MODEL, "messages": [{"role": "user", "content": f"Background {i}"}],
                        "max_tokens": 40 + 10 * (i % 8), "temperature": 0.7, "seed": i, "background": True}
                response = post_with_retry(client, body, deadline)
                assert response.status_code == 202, response.text
                accepted.append(response.json()["id"])
                time.sleep(0.15)  # some before the disruption, the rest during and after it

    def stream_one(i):
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"Stream {i}"}], "max_tokens": stream_tokens,
                "temperature": 0}
        seen: dict = {}
        streams.append(seen)
        started = time.monotonic()
        read_a_stream(stack, i, body, deadline, seen, stream_errors)
        seen["read_s"] = time.monotonic() - started  # how long the read took (a reader that died has none)

    threads = [threading.Thread(target=submit_background)] + [
        threading.Thread(target=stream_one, args=(i,)) for i in range(n_streams)]
    if disrupt is not None:
        threads.append(threading.Thread(target=disrupt, args=(streams, accepted)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(1, deadline - time.monotonic()))

    pollers = [threading.Thread(target=poll_until_over, args=(stack.base_url, job_id, deadline, polls))
               for job_id in accepted]
    for t in pollers:
        t.start()
    for t in pollers:
        t.join(timeout=max(1, deadline - time.monotonic()))

    all_ids = accepted + [s["id"] for s in streams if s.get("id")]

    def all_done():
        return all(stack.job(j).get("status") in TERMINAL for j in all_ids)
    wait_until(all_done, max(10.0, deadline - time.monotonic()), "every job to finish", interval=1)

    mismatches = [m for m in (stream_mismatch(stack, seen, where) for seen in streams) if m is not None]
    return dict(all_ids=all_ids, accepted=accepted, streams=streams, **check_jobs(stack, all_ids, accepted, polls),
                stream_mismatch=len(mismatches), mismatches=mismatches, poll_errors=polls["errors"],
                stream_errors=stream_errors)
