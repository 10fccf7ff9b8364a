"""Nothing lost: a worker killed mid-stream, Redis restarted, the API killed, overload and deadlines.

These tests run their own stacks on a private redis-server with the project's config (AOF), so they can
restart it, and kill processes with SIGKILL as a crash would.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import pytest

from scripts.stack import RedisServer, Stack, iter_sse, stack_env, wait_until

MODEL = "mistralai/mistral-7b-instruct-v0.2"
KEYS = ("res-key-1", "res-key-2", "res-key-3")
HELLO = [{"role": "user", "content": "Tell me a long story."}]


def auth(i=0):
    return {"Authorization": f"Bearer {KEYS[i]}"}


class SSEReader:
    """Reads a chat stream event by event, keeping event ids and arrival times."""

    def __init__(self, response: httpx.Response):
        self.sse = iter_sse(response.iter_lines())
        self.events: list[tuple] = []  # (id, payload, arrival time)

    def next(self):
        event = next(self.sse, None)
        if event is None:
            return None
        self.events.append((*event, time.monotonic()))
        return self.events[-1]

    def read_all(self):
        while (item := self.next()) is not None and item[1] != "[DONE]" and "error" not in item[1]:
            pass

    @property
    def text(self) -> str:
        return "".join(p["choices"][0]["delta"].get("content", "") for _, p, _ in self.events
                       if isinstance(p, dict) and p.get("choices"))

    @property
    def ids(self) -> list[int]:
        return [i for i, _, _ in self.events if i is not None]


def start_stream(stack, **body):
    return httpx.stream("POST", stack.base_url + "/v1/chat/completions", headers=auth(), timeout=120,
                        json={"model": MODEL, "messages": HELLO, "stream": True, "temperature": 0, **body})


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
    with start_stream(rstack, max_tokens=1500) as response:
        reader = SSEReader(response)
        while len(reader.ids) < 10:
            assert reader.next() is not None
        job_id = reader.events[0][1]["id"]
        node = rstack.job(job_id)["worker"].split("@")[0]  # e.g. worker-a-1f2e3d
        victim = next(name for name in rstack.worker_pids() if node.startswith(name + "-"))
        killed_at = time.time()
        rstack.kill(victim)  # SIGKILL: no cleanup, no ack, the lease just stops being renewed
        reader.read_all()
    record = rstack.job(job_id)
    result = json.loads(record["result"])
    assert record["status"] == "completed" and record["attempts"] == "2"
    assert reader.events[-1][1] == "[DONE]"
    assert reader.text == result["text"]                      # nothing lost, nothing repeated
    assert reader.ids == list(range(len(reader.ids)))         # event ids contiguous from 0
    assert result["usage"]["completion_tokens"] == 1500 and result["finish_reason"] == "length"
    recovery = float(record["attempt_started_at"]) - killed_at
    arrivals = [t for _, _, t in reader.events]
    longest_gap = max(b - a for a, b in zip(arrivals, arrivals[1:]))
    terminal_report(["", f"worker SIGKILL -> second attempt started after {recovery:.2f} s; longest gap in the "
                         f"stream {longest_gap:.2f} s"])
    assert 0 < recovery < 2 + 0.5 + 5  # lease + reaper period + pickup
    rstack.start_worker(victim, concurrency=4)  # back to two workers for the next tests
    rstack.wait_workers(2)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


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
    with start_stream(rstack, max_tokens=1500) as response:
        reader = SSEReader(response)
        while len(reader.ids) < 10:
            assert reader.next() is not None
        job_id = reader.events[0][1]["id"]
        node = rstack.job(job_id)["worker"].split("@")[0]
        victim = next(name for name in rstack.worker_pids() if node.startswith(name + "-"))
        engine_pid = engine_process_of(rstack, victim)
        assert engine_pid is not None
        os.kill(engine_pid, signal.SIGKILL)
        reader.read_all()
    record = rstack.job(job_id)
    result = json.loads(record["result"])
    assert record["status"] == "completed" and record["attempts"] == "2"
    assert reader.events[-1][1] == "[DONE]"
    assert reader.text == result["text"]
    assert reader.ids == list(range(len(reader.ids)))
    assert result["usage"]["completion_tokens"] == 1500
    wait_until(lambda: engine_process_of(rstack, victim) not in (None, engine_pid), 90,
               "the crashed worker to come back", interval=1)
    rstack.wait_workers(2)


def test_redis_restart_loses_nothing_and_streams_go_on(rstack, private_redis):
    background = [httpx.post(rstack.base_url + "/v1/chat/completions", headers=auth(), timeout=30,
                             json={"model": MODEL, "messages": HELLO, "max_tokens": 200, "background": True}
                             ).json()["id"] for _ in range(4)]
    with start_stream(rstack, max_tokens=1500) as response:
        reader = SSEReader(response)
        while len(reader.ids) < 5:
            assert reader.next() is not None
        job_id = reader.events[0][1]["id"]
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
        reader.read_all()
    record = rstack.job(job_id)
    assert reader.events[-1][1] == "[DONE]", reader.events[-1]
    assert reader.text == json.loads(record["result"])["text"]
    assert reader.ids == list(range(len(reader.ids)))
    for bg in background:  # accepted before the restart: none lost
        wait_until(lambda: rstack.job(bg).get("status") == "completed", 60, f"background job {bg}")
    after = httpx.post(rstack.base_url + "/v1/chat/completions", headers=auth(), timeout=60,
                       json={"model": MODEL, "messages": HELLO, "max_tokens": 5})
    assert after.status_code == 200  # API and workers reconnected by themselves


def test_api_killed_mid_stream_client_resumes_with_last_event_id(rstack):
    with start_stream(rstack, max_tokens=800) as response:
        reader = SSEReader(response)
        while len(reader.ids) < 5:
            assert reader.next() is not None
        job_id = reader.events[0][1]["id"]
        rstack.kill("api")
    last_id = reader.ids[-1]
    rstack.start_api()
    rstack.wait_ready()
    url = f"{rstack.base_url}/v1/chat/completions/{job_id}/events"
    with httpx.stream("GET", url, headers={**auth(), "Last-Event-ID": str(last_id)}, timeout=120) as response:
        rest = SSEReader(response)
        rest.read_all()
    record = rstack.job(job_id)
    assert record["status"] == "completed"  # an API crash does not cancel the job
    assert rest.ids[0] == last_id + 1
    assert reader.text + rest.text == json.loads(record["result"])["text"]


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
    wait_until(lambda: limited_stack.redis.llen(queue) == 0 and not limited_stack.redis.zcard(
        f"{limited_stack.prefix}:leases"), 60, "the queue to drain")


def test_deadlines_end_jobs_with_a_clear_error(limited_stack):
    job_id = submit(limited_stack, 2, **LONG).json()["id"]  # a generation longer than 3 s
    record = wait_until(lambda: (r := limited_stack.job(job_id)).get("status") in ("failed", "completed") and r,
                        90, "the deadline")
    assert record["status"] == "failed"
    assert json.loads(record["error"])["code"] == "deadline_exceeded"


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
