"""A job cut by a lost worker machine or by a Redis restart finishes with the text it would have had uncut,
sampled or greedy.

The sampler's randomness is a function of (seed, output position) and a resumed attempt counts the tokens fed
back to it as output, so the second attempt draws what the first would have drawn. Checked as a user sees it:
the official SDK (sync and async, streamed and not) sends seeded requests once on a healthy stack, then again
while a fault hits them mid-generation: the worker holding them SIGKILLed with its whole process group
(supervisor, worker, engine process), or Redis stopped for longer than a lease, so that every running attempt
is fenced and the jobs are resumed once it is back. Every text must equal its clean run's.
"""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from scripts.stack import RedisServer, Stack, chunk_text, stack_env

MODEL = "mistralai/mistral-7b-instruct-v0.2"
KEY = "exact-resume-key"
MAX_TOKENS = 600  # seconds of generation here: the kill lands well inside it
# Seeded sampling at the docs' default temperature, with a nucleus, with penalties; and greedy.
WORKLOADS = [dict(temperature=0.8, top_p=0.95), dict(), dict(temperature=1.0, frequency_penalty=0.5,
                                                               presence_penalty=0.5), dict(temperature=0)]
REQUESTS = [dict(messages=[{"role": "user", "content": f"Story number {i}, please."}], seed=1000 + i,
                 max_tokens=MAX_TOKENS, **WORKLOADS[i % len(WORKLOADS)]) for i in range(12)]
for i in (2, 3):  # two of them with two choices each (issue 15), one streamed and one not: each choice resumes
    REQUESTS[i]["n"] = 2
SEPARATOR = "\x1e"  # between a request's choices in its text


LEASE_S = 2


@pytest.fixture
def redis_server(tmp_path):
    """A Redis of the test's own (the project's config: AOF), which it may restart."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def stack(tmp_path, redis_server):
    env = stack_env(redis_url=redis_server.url, api_keys=(KEY,), JOB_LEASE_S=str(LEASE_S),
                    REAPER_INTERVAL_S="0.5", HEARTBEAT_TTL_S="4", STREAM_INTERVAL_S="0.01")
    s = Stack(env, tmp_path)
    s.start_api()
    s.start_worker("worker-a", concurrency=len(REQUESTS))
    with s.serving():
        yield s


def run_all(stack: Stack, on_first_deltas=None) -> tuple[list[str], list[str]]:
    """Every request through the SDK: the even ones streamed (sync, and async for every fourth), the odd ones
    not. `on_first_deltas` runs once every stream has shown text (while all jobs still generate).
    Returns each request's text and job id."""
    texts: list[str] = [""] * len(REQUESTS)
    ids: list[str] = [""] * len(REQUESTS)
    streamed = [i for i in range(len(REQUESTS)) if i % 2 == 0]
    started = threading.Barrier(len(streamed) + 1)
    sync_client = stack.sdk(KEY, timeout=180)

    def stream_sync(i: int) -> None:
        chunks = sync_client.chat.completions.create(model=MODEL, stream=True, **REQUESTS[i])
        first, parts = True, {}
        for chunk in chunks:
            ids[i] = chunk.id
            for choice in chunk.choices:
                parts[choice.index] = parts.get(choice.index, "") + (choice.delta.content or "")
            texts[i] = SEPARATOR.join(parts[k] for k in sorted(parts))
            if first and texts[i].strip(SEPARATOR):
                first = False
                started.wait(60)

    def stream_async(i: int) -> None:
        async def read() -> None:
            client = stack.sdk(KEY, asynchronous=True, timeout=180)
            first = True
            async for chunk in await client.chat.completions.create(model=MODEL, stream=True, **REQUESTS[i]):
                ids[i] = chunk.id
                texts[i] += chunk_text(chunk)
                if first and texts[i]:
                    first = False
                    await asyncio.get_running_loop().run_in_executor(None, started.wait, 60)
            await client.close()
        asyncio.run(read())

    def whole(i: int) -> None:
        completion = sync_client.chat.completions.create(model=MODEL, **REQUESTS[i])
        assert [c.index for c in completion.choices] == list(range(REQUESTS[i].get("n", 1)))
        ids[i], texts[i] = completion.id, SEPARATOR.join(c.message.content for c in completion.choices)

    threads = [threading.Thread(target=(stream_async if i % 4 == 0 else stream_sync) if i in streamed else whole,
                                args=(i,), daemon=True) for i in range(len(REQUESTS))]
    for thread in threads:
        thread.start()
    started.wait(120)
    if on_first_deltas is not None:
        on_first_deltas()
    for thread in threads:
        thread.join(240)
        assert not thread.is_alive(), "a request never finished"
    return texts, ids


def test_seeded_requests_cut_by_a_lost_worker_equal_their_clean_run(stack):
    clean, _ = run_all(stack)
    assert all(clean) and len(set(clean)) == len(clean)

    def lose_worker_a() -> None:
        stack.start_worker("worker-b", concurrency=len(REQUESTS))
        stack.kill("worker-a")  # its process group: supervisor, worker and engine process, as a lost machine

    cut, ids = run_all(stack, on_first_deltas=lose_worker_a)
    attempts = [int(stack.job(job_id).get("attempts", 0)) for job_id in ids]
    assert all(n >= 2 for n in attempts), f"not every job was cut and resumed: attempts {attempts}"
    mismatches = [i for i, (a, b) in enumerate(zip(clean, cut)) if a != b]
    assert not mismatches, [(REQUESTS[i], clean[i][:60], cut[i][:60]) for i in mismatches]


def test_seeded_requests_through_a_redis_restart_equal_their_clean_run(stack, redis_server):
    clean, _ = run_all(stack)

    def restart_redis() -> None:
        redis_server.stop(graceful=True)
        time.sleep(LEASE_S + 1.5)  # every lease lapses meanwhile: the running attempts are fenced
        redis_server.start()

    cut, ids = run_all(stack, on_first_deltas=restart_redis)
    attempts = [int(stack.job(job_id).get("attempts", 0)) for job_id in ids]
    assert any(n >= 2 for n in attempts), f"no job was resumed after the restart: attempts {attempts}"
    mismatches = [i for i, (a, b) in enumerate(zip(clean, cut)) if a != b]
    assert not mismatches, [(REQUESTS[i], clean[i][:60], cut[i][:60]) for i in mismatches]
