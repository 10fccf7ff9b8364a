"""Jobs of a worker that is lost (its machine gone) or hung (alive, its engine not stepping), against the real
stack: two workers holding two jobs each, leases of 2 s, the official SDK reading the streams.

- Cancelling a job that a lost worker's lapsed lease put back on the queue (its log already has events)
  answers 200 and `cancelled`, and its stream ends with the cancel (issue 13, case 1: it answered 500 and the
  job stayed queued, because the API ended it with event seq 0).
- A worker whose engine hangs (its process stopped: alive, not stepping) gives its jobs up: it stops renewing
  their leases and exits after ENGINE_STALL_S, and the streams go on from another worker with the text of a
  clean run (issue 13, case 5: the worker kept renewing, and the jobs waited for their deadline).
"""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import httpx
import openai
import pytest

from scripts.stack import Stack, chunk_text, job_events_stream, stack_env, wait_until

MODEL = "mistralai/mistral-7b-instruct-v0.2"
KEY = "lost-workers-key"
LONG = 3000  # tokens: tens of seconds of generation here, far longer than the test needs


@pytest.fixture
def stack(tmp_path):
    env = stack_env(api_keys=(KEY,), JOB_LEASE_S="2", REAPER_INTERVAL_S="0.5", HEARTBEAT_TTL_S="4",
                    STREAM_INTERVAL_S="0.01", ENGINE_STALL_S="5")
    s = Stack(env, tmp_path)
    s.start_api()
    s.start_worker("worker-a", concurrency=2)
    s.start_worker("worker-b", concurrency=2)
    with s.serving():
        s.wait_workers(2)
        yield s


def submit(stack: Stack, **body) -> str:
    response = httpx.post(stack.base_url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": MODEL, "messages": [{"role": "user", "content": "A long story."}],
                                "background": True, "max_tokens": LONG, **body}, timeout=30)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def cancel(stack: Stack, job_id: str) -> httpx.Response:
    return httpx.post(f"{stack.base_url}/v1/chat/completions/{job_id}/cancel",
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30)


def log_length(stack: Stack, job_id: str) -> int:
    return stack.job_redis(job_id).xlen(f"{stack.prefix}:job:{job_id}:log")


def read_stream(client: openai.OpenAI, job_id: str) -> tuple[str, str]:
    """The job's text as the SDK streams it, and how the stream ended ("done" or the error's code)."""
    text = ""
    try:
        for chunk in job_events_stream(client, job_id):
            text += chunk_text(chunk)
    except openai.APIError as exc:
        return text, (exc.body or {}).get("code", str(exc))
    return text, "done"


def test_cancelling_what_a_lost_workers_leases_requeued(stack):
    jobs = [submit(stack, seed=i) for i in range(4)]
    wait_until(lambda: all(stack.job(j).get("status") == "in_progress" and log_length(stack, j) > 0 for j in jobs),
               60, "all four jobs streaming")
    lost = [j for j in jobs if stack.worker_of(j) == "worker-a"]
    assert len(lost) == 2  # two jobs on each worker
    stack.kill("worker-a")  # its whole process group: the machine is gone
    # Worker b's reaper puts them back on the queue; b is busy with its own two, so they wait there.
    wait_until(lambda: all(stack.job(j)["status"] == "queued" for j in lost), 30, "the lost jobs requeued")
    client = stack.sdk(KEY)
    for job_id in lost:
        events_before = log_length(stack, job_id)
        response = cancel(stack, job_id)
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "cancelled"
        text, ending = read_stream(client, job_id)
        assert ending == "job_cancelled" and text  # the deltas of the lost attempt, then the cancel
        assert log_length(stack, job_id) == events_before + 1
    for job_id in jobs:
        if job_id not in lost:
            assert cancel(stack, job_id).status_code == 200
    wait_until(lambda: all(stack.job(j)["status"] == "cancelled" for j in jobs), 60, "every job cancelled")


def engine_process_of(stack: Stack, worker: str) -> int:
    """The pid of a worker's engine process: the spawned child in the worker's process group."""
    group = stack.processes[worker].pid
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and os.getpgid(int(proc.name)) == group and \
                    b"spawn_main" in (proc / "cmdline").read_bytes():
                return int(proc.name)
        except (ProcessLookupError, PermissionError, FileNotFoundError):
            continue
    raise AssertionError(f"no engine process in {worker}'s group")


def test_a_hung_engine_gives_its_jobs_to_another_worker(stack):
    client = stack.sdk(KEY)
    request = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me about rivers."}], max_tokens=500,
                   seed=11, temperature=0.7)
    clean = client.chat.completions.create(**request).choices[0].message.content
    streamed: dict = {"text": "", "id": None}
    first_text = threading.Event()

    def read() -> None:
        for chunk in client.chat.completions.create(**request, stream=True):
            streamed["id"] = chunk.id
            streamed["text"] += chunk_text(chunk)
            if streamed["text"]:
                first_text.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert first_text.wait(60)
    hung_worker, hung_node = stack.worker_of(streamed["id"]), stack.job(streamed["id"])["worker"]
    engine_pid = engine_process_of(stack, hung_worker)
    os.kill(engine_pid, signal.SIGSTOP)  # alive, holding the job, never stepping again
    try:
        reader.join(90)
        assert not reader.is_alive(), "the stream did not end"
    finally:
        try:
            os.kill(engine_pid, signal.SIGCONT)
        except ProcessLookupError:
            pass  # the hung worker killed it, as it should
    assert streamed["text"] == clean  # resumed elsewhere, exactly where it stopped
    job = stack.job(streamed["id"])
    assert job["status"] == "completed" and int(job["attempts"]) == 2 and job["worker"] != hung_node
    log = (stack.log_dir / f"{hung_worker}.log").read_text()
    assert "the engine made no step" in log
