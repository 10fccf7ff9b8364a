"""Nothing lost: a worker killed mid-stream, Redis restarted, the API killed, overload and deadlines.

These tests run their own stacks on a private redis-server with the project's config (AOF), so they can
restart it, and kill processes with SIGKILL as a crash would.

A stream through a fault is read as users read it, with the official SDK, sync and async: while the test's
own sync stream runs, `Watchers` read the same job's events with the SDK's async client, and as raw lines,
for the event ids (the SDK does not show them).
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import httpx
import openai
import pytest

from scripts.stack import (RedisServer, Stack, chunk_text, descendants, iter_sse, job_events_stream, stack_env,
                          wait_until)

MODEL = "mistralai/mistral-7b-instruct-v0.2"
KEYS = ("res-key-1", "res-key-2", "res-key-3")
HELLO = [{"role": "user", "content": "Tell me a long story."}]
GREEDY = dict(model=MODEL, messages=HELLO, temperature=0)


def auth(i=0):
    return {"Authorization": f"Bearer {KEYS[i]}"}


class SSEReader:
    """Reads a chat stream's raw lines event by event, keeping the event ids."""

    def __init__(self, response: httpx.Response):
        self.sse = iter_sse(response.iter_lines())
        self.events: list[tuple] = []  # (id, payload)

    def next(self):
        event = next(self.sse, None)
        if event is not None:
            self.events.append(event)
        return event

    def read_all(self):
        while (item := self.next()) is not None and item[1] != "[DONE]" and "error" not in item[1]:
            pass

    @property
    def text(self) -> str:
        return "".join(p["choices"][0]["delta"].get("content", "") for _, p in self.events
                       if isinstance(p, dict) and p.get("choices"))

    @property
    def ids(self) -> list[int]:
        return [i for i, _ in self.events if i is not None]


def start_stream(stack, **body):
    return httpx.stream("POST", stack.base_url + "/v1/chat/completions", headers=auth(), timeout=120,
                        json={**GREEDY, "stream": True, **body})


class SDKReader:
    """A chat completion streamed with the official SDK's sync client, read delta by delta, with the
    arrival time of each chunk."""

    def __init__(self, stack, **body):
        self.chunks = iter(stack.sdk(KEYS[0]).chat.completions.create(stream=True, **GREEDY, **body))
        self.job_id, self.text, self.deltas, self.arrivals = None, "", 0, []

    def read(self, deltas: int | None = None) -> None:
        """On until `deltas` deltas in all, or to the end of the stream."""
        for chunk in self.chunks:
            self.job_id = chunk.id
            self.arrivals.append(time.monotonic())
            if text := chunk_text(chunk):
                self.text += text
                self.deltas += 1
                if self.deltas == deltas:
                    return


class Watchers:
    """Two more clients of a job's stream, reading its events from the start in their own threads while the
    test goes on: the SDK's async client, and the raw lines."""

    def __init__(self, stack, job_id: str):
        self.stack, self.job_id = stack, job_id
        pool = ThreadPoolExecutor(2)
        sdk_started, raw_started = threading.Event(), threading.Event()
        self.sdk: Future = pool.submit(asyncio.run, self._read_with_sdk(sdk_started))
        self.raw: Future = pool.submit(self._read_raw, raw_started)
        pool.shutdown(wait=False)  # no more work for it; the two readers run on
        for started, reader in ((sdk_started, self.sdk), (raw_started, self.raw)):
            while not started.wait(0.1):  # each has its stream open (a first delta) before the fault
                if reader.done():
                    reader.result()  # raises what it failed with
                    raise AssertionError("a watcher's stream ended before its first delta")

    async def _read_with_sdk(self, started: threading.Event) -> str:
        text = ""
        async with self.stack.sdk(KEYS[0], asynchronous=True) as client:
            async for chunk in await job_events_stream(client, self.job_id):
                text += chunk_text(chunk)
                if text:
                    started.set()
        return text

    def _read_raw(self, started: threading.Event) -> SSEReader:
        url = f"{self.stack.base_url}/v1/chat/completions/{self.job_id}/events"
        with httpx.stream("GET", url, headers=auth(), timeout=120) as response:
            reader = SSEReader(response)
            while not reader.ids:
                assert reader.next() is not None
            started.set()
            reader.read_all()
        return reader

    def assert_read_whole(self, text: str) -> None:
        """Both read the job to its end: `text`, in events numbered from 0 without a gap, then [DONE]."""
        assert self.sdk.result(timeout=120) == text
        raw = self.raw.result(timeout=120)
        assert raw.events[-1][1] == "[DONE]", raw.events[-1]
        assert raw.text == text                       # nothing lost, nothing repeated
        assert raw.ids == list(range(len(raw.ids)))   # event ids contiguous from 0


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis-data"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def rstack(private_redis, tmp_path_factory):
    """Two workers with short leases, so a dead worker's job is picked up within ~2.5 s."""
    env = stack_env(redis_url=private_redis.url, api_keys=KEYS, JOB_LEASE_S="2", REAPER_INTERVAL_S="0.5",
                    HEARTBEAT_INTERVAL_S="0.5", HEARTBEAT_TTL_S="3", LOST_DELIVERY_S="5")
    stack = Stack(env, tmp_path_factory.mktemp("rstack-logs"))
    stack.start_worker("worker-a", concurrency=4)
    stack.start_worker("worker-b", concurrency=4)
    stack.start_api()
    stack.wait_ready()
    stack.wait_workers(2)
    yield stack
    stack.stop_all()


def test_worker_killed_mid_stream_resumes_without_loss_or_repeat(rstack, terminal_report):
    reader = SDKReader(rstack, max_tokens=1500)
    reader.read(deltas=10)
    watchers = Watchers(rstack, reader.job_id)
    victim = rstack.worker_of(reader.job_id)
    killed_at = time.time()
    rstack.kill(victim)  # SIGKILL: no cleanup, no ack, the lease just stops being renewed
    reader.read()
    record = rstack.job(reader.job_id)
    result = json.loads(record["result"])
    assert record["status"] == "completed" and record["attempts"] == "2"
    assert reader.text == result["text"]
    watchers.assert_read_whole(result["text"])
    assert result["usage"]["completion_tokens"] == 1500 and result["finish_reason"] == "length"
    recovery = float(record["attempt_started_at"]) - killed_at
    longest_gap = max(b - a for a, b in zip(reader.arrivals, reader.arrivals[1:]))
    terminal_report(["", f"worker SIGKILL -> second attempt started after {recovery:.2f} s; longest gap in the "
                         f"stream {longest_gap:.2f} s"])
    assert 0 < recovery < 2 + 0.5 + 5  # lease + reaper period + pickup
    rstack.start_worker(victim, concurrency=4)  # back to two workers for the next tests
    rstack.wait_workers(2)


def engine_process_of(stack, worker: str):
    """The pid of the worker's engine process (spawned by multiprocessing), or None."""
    for pid in descendants(stack.processes[worker].pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"spawn_main" in f.read():  # not its resource tracker
                    return pid
        except OSError:
            continue
    return None


def test_an_engine_process_crash_hands_its_jobs_to_a_worker_without_loss_or_repeat(rstack):
    """The engine process dies alone (a CUDA fault, say): its worker exits, so the job's lease lapses and
    another worker resumes it; the supervisor starts the crashed worker again."""
    reader = SDKReader(rstack, max_tokens=1500)
    reader.read(deltas=10)
    watchers = Watchers(rstack, reader.job_id)
    victim = rstack.worker_of(reader.job_id)
    engine_pid = engine_process_of(rstack, victim)
    assert engine_pid is not None
    os.kill(engine_pid, signal.SIGKILL)
    reader.read()
    record = rstack.job(reader.job_id)
    result = json.loads(record["result"])
    assert record["status"] == "completed" and record["attempts"] == "2"
    assert reader.text == result["text"]
    watchers.assert_read_whole(result["text"])
    assert result["usage"]["completion_tokens"] == 1500
    wait_until(lambda: engine_process_of(rstack, victim) not in (None, engine_pid), 90,
               "the crashed worker to come back", interval=1)
    rstack.wait_workers(2)


def test_redis_restart_loses_nothing_and_streams_go_on(rstack, private_redis):
    background = [httpx.post(rstack.base_url + "/v1/chat/completions", headers=auth(), timeout=30,
                             json={"model": MODEL, "messages": HELLO, "max_tokens": 200, "background": True}
                             ).json()["id"] for _ in range(4)]
    reader = SDKReader(rstack, max_tokens=1500)
    reader.read(deltas=5)
    watchers = Watchers(rstack, reader.job_id)
    private_redis.stop(graceful=True)
    try:
        during = httpx.post(rstack.base_url + "/v1/chat/completions", headers=auth(), timeout=30,
                            json={"model": MODEL, "messages": HELLO, "max_tokens": 5})
        assert during.status_code == 503 and during.headers["Retry-After"]
        assert during.json()["error"]["code"] == "queue_unavailable"
        assert httpx.get(rstack.base_url + "/health", timeout=5).status_code == 200
        time.sleep(2)
    finally:
        private_redis.start()
    reader.read()
    text = json.loads(rstack.job(reader.job_id)["result"])["text"]
    assert reader.text == text
    watchers.assert_read_whole(text)
    for bg in background:  # accepted before the restart: none lost
        wait_until(lambda: rstack.job(bg).get("status") == "completed", 60, f"background job {bg}")
    after = httpx.post(rstack.base_url + "/v1/chat/completions", headers=auth(), timeout=60,
                       json={"model": MODEL, "messages": HELLO, "max_tokens": 5})
    assert after.status_code == 200  # API and workers reconnected by themselves


def test_api_killed_mid_stream_client_resumes_with_last_event_id(rstack):
    """The client that resumes reads the raw lines: it needs the event ids, which the SDK does not show. The
    SDK's own stream of the job ends with a connection error, and the SDK, sync and async, reads the rest
    after the last event id."""
    client = rstack.sdk(KEYS[0])
    with start_stream(rstack, max_tokens=800) as response:
        reader = SSEReader(response)
        while len(reader.ids) < 5:
            assert reader.next() is not None
        job_id = reader.events[0][1]["id"]
        sdk_stream = iter(job_events_stream(client, job_id))
        next(sdk_stream)  # open: its role chunk came
        rstack.kill("api")
    with pytest.raises(openai.APIConnectionError):
        for _ in sdk_stream:
            pass
    last_id = reader.ids[-1]
    rstack.start_api()
    rstack.wait_ready()

    async def rest_with_async_sdk() -> str:
        async with rstack.sdk(KEYS[0], asynchronous=True) as aclient:
            return "".join([chunk_text(chunk) async for chunk in await job_events_stream(aclient, job_id, last_id)])

    rest = "".join(chunk_text(chunk) for chunk in job_events_stream(client, job_id, last_id))
    record = rstack.job(job_id)
    assert record["status"] == "completed"  # an API crash does not cancel the job
    assert reader.text + rest == json.loads(record["result"])["text"]
    assert asyncio.run(rest_with_async_sdk()) == rest


def test_health_answers_under_a_flood_of_streams(rstack, terminal_report):
    """150 open streams (most waiting for a slot, with keep-alives); /health timed by curl, a separate
    process, so the flood's own client does not slow the measurement."""
    async def flood():
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=300)) as client:
            async def one_stream():
                async with client.stream("POST", rstack.base_url + "/v1/chat/completions", headers=auth(),
                                         json={"model": MODEL, "messages": HELLO, "stream": True,
                                               "max_tokens": 400}) as response:
                    async for _ in response.aiter_lines():
                        pass
            streams = [asyncio.create_task(one_stream()) for _ in range(150)]
            await asyncio.sleep(3)
            timings = []
            for _ in range(10):
                probe = await asyncio.create_subprocess_exec(
                    "curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{time_total}", rstack.base_url + "/health",
                    stdout=asyncio.subprocess.PIPE)
                code, seconds = (await probe.communicate())[0].decode().split()
                assert code == "200"
                timings.append(float(seconds))
            for task in streams:
                task.cancel()
            await asyncio.gather(*streams, return_exceptions=True)
            return timings

    timings = asyncio.run(flood())
    terminal_report(["", f"/health under 150 open streams: median {sorted(timings)[5] * 1000:.0f} ms, "
                         f"max {max(timings) * 1000:.0f} ms"])
    assert max(timings) < 2.0


@pytest.fixture(scope="module")
def limited_stack(tmp_path_factory):
    """One single-slot worker, tight caps and a short deadline."""
    env = stack_env(api_keys=KEYS, MAX_QUEUED_JOBS="3", MAX_UNFINISHED_PER_KEY="2", JOB_DEADLINE_S="3",
                    MAX_MODEL_LEN="32768", BATCH_SLOTS="1")
    stack = Stack(env, tmp_path_factory.mktemp("limited-logs"))
    stack.start_worker(concurrency=1)
    stack.start_api()
    stack.wait_ready()
    yield stack
    stack.stop_all()
    stack.cleanup_redis()


# A generation that outlasts the 3 s deadline: greedy, the tiny random model loops without ever choosing EOS
# (5265 tokens in 5 s, none of them EOS), while the default sampling (0.3, seed 0) ends with EOS after 1334
# tokens, which a fast CPU produces in 2 s.
LONG = dict(max_tokens=30000, temperature=0)


def submit(stack, key, **body):
    return httpx.post(stack.base_url + "/v1/chat/completions", headers=auth(key), timeout=30,
                      json={"model": MODEL, "messages": HELLO, "background": True, **body})


def test_overload_is_429_with_retry_after(limited_stack):
    first = submit(limited_stack, 0, **LONG)  # runs (until its deadline)
    wait_until(lambda: limited_stack.job(first.json()["id"]).get("status") == "in_progress", 30, "first job")
    assert submit(limited_stack, 0, max_tokens=5).status_code == 202   # queued: 2 unfinished for key 0
    too_many = submit(limited_stack, 0, max_tokens=5)
    assert too_many.status_code == 429 and too_many.json()["error"]["code"] == "too_many_jobs"
    assert int(too_many.headers["Retry-After"]) >= 1
    assert submit(limited_stack, 1, max_tokens=5).status_code == 202
    assert submit(limited_stack, 1, max_tokens=5).status_code == 202   # 3 waiting in the queue now
    full = submit(limited_stack, 2, max_tokens=5)
    assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"
    assert int(full.headers["Retry-After"]) >= 1
    # Drain: the first job ends at its deadline, then the queued ones run.
    queue = limited_stack.env["INTERACTIVE_QUEUE"]
    wait_until(lambda: limited_stack.redis.llen(queue) == 0 and not any(
        shard.zcard(f"{limited_stack.prefix}:leases") for shard in limited_stack.shards), 60, "the queue to drain")


def test_deadlines_end_jobs_with_a_clear_error(limited_stack):
    job_id = submit(limited_stack, 2, **LONG).json()["id"]  # a generation longer than 3 s
    record = wait_until(lambda: (r := limited_stack.job(job_id)).get("status") in ("failed", "completed") and r,
                        90, "the deadline")
    assert record["status"] == "failed"
    assert json.loads(record["error"])["code"] == "deadline_exceeded"

    # Streamed (one after the other: the worker has one slot), the SDK raises the error after the deltas.
    text = ""
    with pytest.raises(openai.APIError) as failure:
        for chunk in limited_stack.sdk(KEYS[2]).chat.completions.create(model=MODEL, messages=HELLO, stream=True,
                                                                         **LONG):
            text += chunk_text(chunk)
    assert text and failure.value.code == "deadline_exceeded"

    async def stream_with_async_sdk() -> tuple[str, openai.APIError]:
        text = ""
        async with limited_stack.sdk(KEYS[2], asynchronous=True) as aclient:
            try:
                async for chunk in await aclient.chat.completions.create(model=MODEL, messages=HELLO, stream=True,
                                                                         **LONG):
                    text += chunk_text(chunk)
            except openai.APIError as error:
                return text, error
        raise AssertionError("the stream ended without an error")

    text, error = asyncio.run(stream_with_async_sdk())
    assert text and error.code == "deadline_exceeded"


def test_a_message_lost_with_a_worker_that_died_before_starting_the_job_is_sent_again(tmp_path):
    """A worker takes a job's message from the queue and dies before it starts the job: the message sits in
    that worker's unacked set (until the broker's hours-long visibility timeout), the job stays `queued` and
    the queue looks empty. The lost-delivery reaper must send it again within LOST_DELIVERY_S."""
    env = stack_env(api_keys=KEYS, LOST_DELIVERY_S="2", REAPER_INTERVAL_S="0.5")
    stack = Stack(env, tmp_path)
    try:
        stack.start_worker(concurrency=1)
        stack.start_api()
        stack.wait_ready()
        stack.stop("worker")  # the API still knows the model; nobody consumes the queue now
        job_id = submit(stack, 0, max_tokens=5).json()["id"]
        queue = env["INTERACTIVE_QUEUE"]
        assert stack.redis.rpop(queue) is not None  # what a worker's fetch does; then it "dies" with it
        assert stack.job(job_id)["status"] == "queued" and stack.redis.llen(queue) == 0
        stack.start_worker(concurrency=1)
        record = wait_until(lambda: (r := stack.job(job_id)).get("status") == "completed" and r, 60,
                            "the lost job to be sent again and run")
        assert record["attempts"] == "1"
    finally:
        stack.stop_all()
        stack.cleanup_redis()
