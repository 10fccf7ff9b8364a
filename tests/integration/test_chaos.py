"""Chaos: a few hundred jobs, some streamed, while workers are SIGKILLed and Redis restarts, and clients cancel
background jobs (queued, parked in their key's fair queue, running, or put back on the queue by a kill) all
the while, and fair dispatchers die in the middle of moves (a job taken from its key's queue and never sent,
or sent and never confirmed: what a process killed at that point leaves). Then every job is
checked: ended exactly once (completed, or cancelled if a cancel was asked for; every cancel answered 200),
its event log contiguous with one final event, its streamed text equal to its final text, none lost. Prints
the figures. Bounded in time (about two minutes here).

The streams are read as users read them: a third with the official SDK's sync client, a third with its async
client, and a third as raw lines, which resume after their last event id."""
from __future__ import annotations

import collections
import json
import os
import random
import threading
import time

import httpx
import kombu.exceptions
import pytest
import redis

from app.auth import owner_of
from config.settings import Settings
from jobs.celery_app import RUN_CHAT_COMPLETION, make_celery
from jobs.records import GenerationRequest, JobRecord
from jobs.shards import ShardedJobStore
from jobs.store import JobStore
from scripts.stack import RedisServer, stack_env, wait_until
from tests.integration.mixed_load import AUTH, KEY, MODEL, post_with_retry, read_a_stream, running_stack

N_JOBS, N_STREAMS, N_WORKERS = int(os.environ.get("CHAOS_JOBS", 200)), 20, 3
MAX_KILLS = 6
# A background job as the API records it (tokenized, checked) for the dying dispatcher to take.
PARKED_REQUEST = GenerationRequest(model=MODEL, prompt_token_ids=[1, 733, 16289, 28793], max_tokens=12,
                                   temperature=0.7, top_p=1.0, frequency_penalty=0.0, presence_penalty=0.0, seed=3)


@pytest.fixture
def chaos_stack(tmp_path):
    server = RedisServer(tmp_path / "redis")
    server.start()
    env = stack_env(redis_url=server.url, api_keys=(KEY,), JOB_LEASE_S="2", REAPER_INTERVAL_S="0.5",
                    HEARTBEAT_INTERVAL_S="0.5", HEARTBEAT_TTL_S="3", LOST_DELIVERY_S="5")
    with running_stack(env, tmp_path, N_WORKERS) as stack:
        yield stack, server
    server.stop()


@pytest.mark.timeout(900)
def test_chaos(chaos_stack, terminal_report):
    stack, redis_server = chaos_stack
    rng = random.Random(7)
    deadline = time.monotonic() + 240
    accepted: list[str] = []
    streams: list[dict] = []
    kills: list[float] = []
    redis_restarts = 0
    stream_errors = collections.Counter()
    chaos_over = threading.Event()
    cancels: dict[str, str] = {}  # job id -> the status the cancel answered
    cancel_answers = collections.Counter()
    dispatcher_deaths = collections.Counter()  # what each dead dispatcher left: "never sent" / "not confirmed"

    def submit_jobs():
        # N_JOBS, then more (a few a second) until the chaos is over: on a fast machine N_JOBS alone can be
        # done before the Redis restart, which must find jobs queued and running.
        with httpx.Client(base_url=stack.base_url, timeout=60) as client:
            i = 0
            while i < N_JOBS or (not chaos_over.is_set() and time.monotonic() < deadline):
                body = {"model": MODEL, "messages": [{"role": "user", "content": f"Job {i}"}],
                        "max_tokens": rng.randint(10, 80), "temperature": 0.7, "seed": i, "background": True}
                response = post_with_retry(client, body, deadline)
                assert response.status_code == 202, response.text
                accepted.append(response.json()["id"])
                i += 1
                if i >= N_JOBS:
                    time.sleep(0.2)

    def stream_one(i):
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"Stream {i}"}], "max_tokens": 200,
                "temperature": 0}
        seen: dict = {}
        streams.append(seen)
        read_a_stream(stack, i, body, deadline, seen, stream_errors)

    def chaos():
        nonlocal redis_restarts
        time.sleep(2)
        round_ = 0
        while round_ < MAX_KILLS and time.monotonic() < deadline:
            round_ += 1
            victim = rng.choice(sorted(stack.worker_pids()))
            kills.append(time.time())
            stack.kill(victim)
            time.sleep(1)
            stack.start_worker(victim, concurrency=8)
            if round_ == 2:
                redis_server.stop(graceful=True)
                time.sleep(2)
                redis_server.start()
                redis_restarts += 1
            time.sleep(5)
        chaos_over.set()

    def cancel_some():
        """A cancel every half second or so, of a random accepted background job, until the chaos is over."""
        with httpx.Client(base_url=stack.base_url, timeout=60) as client:
            while not chaos_over.is_set() and time.monotonic() < deadline:
                time.sleep(rng.uniform(0.2, 0.8))
                candidates = [j for j in accepted[-60:] if j not in cancels]
                if not candidates:
                    continue
                job_id = rng.choice(candidates)
                try:
                    response = client.post(f"/v1/chat/completions/{job_id}/cancel", headers=AUTH)
                except httpx.TransportError:
                    cancel_answers["connection error"] += 1  # Redis or the API restarting: not asked
                    continue
                cancel_answers[response.status_code] += 1
                if response.status_code == 200:
                    cancels[job_id] = response.json()["status"]
                elif response.status_code == 503:
                    # Redis went away during the cancel: it may have ended the job before the answer's read
                    # failed (a retry is safe: cancelling is idempotent). The job may end either way.
                    cancels.setdefault(job_id, "unknown")
                else:
                    cancel_answers[f"{response.status_code} {response.text[:120]}"] += 1

    def die_mid_dispatch():
        """A fair dispatcher killed in the middle of a move, every second or so: it took a parked job (the Lua
        move: the job is `sending`) and died before the send, or after the send and before confirming it."""
        fair_redis = redis.Redis.from_url(redis_server.url, decode_responses=True, socket_timeout=5)
        # Every shard's parked jobs (TEST_REDIS_SHARDS=3: the stack's job state over three databases).
        shard_clients = [fair_redis if url == redis_server.url else
                         redis.Redis.from_url(url, decode_responses=True, socket_timeout=5) for url in stack.shard_urls]
        store = ShardedJobStore([JobStore(client, stack.prefix, ttl_s=3600) for client in shard_clients])
        celery = make_celery(Settings(redis_url=redis_server.url))
        queue = stack.env["INTERACTIVE_QUEUE"]
        while not chaos_over.is_set() and time.monotonic() < deadline:
            time.sleep(rng.uniform(0.5, 1.5))
            try:
                # More room than the queue's margin: a dispatcher of another configuration, or one racing. A fast
                # machine's pumps leave a job parked only for moments: try often until one is there.
                taken, trying_until = [], time.monotonic() + 3.0
                while not taken and time.monotonic() < trying_until:
                    taken = store.fair.take(queue, room=fair_redis.llen(queue) + 1)
                    time.sleep(0 if taken else 0.01)
                if not taken:  # the pumps kept up (no job parked for 3 s): park one as the API does at a busy pool
                    record = JobRecord.new(PARKED_REQUEST, kind="background", owner=owner_of(KEY), queue=queue)
                    store.create(record, parked=True)
                    accepted.append(record.id)  # checked as every other job: ended exactly once
                    taken = store.fair.take(queue, room=fair_redis.llen(queue) + 1)
                for job_id in taken:
                    if sum(dispatcher_deaths.values()) % 2:  # every other one: died after the send
                        celery.send_task(RUN_CHAT_COMPLETION, args=[job_id], queue=queue)
                        dispatcher_deaths["sent, not confirmed"] += 1
                    else:
                        dispatcher_deaths["never sent"] += 1
            except (redis.RedisError, OSError, kombu.exceptions.OperationalError):
                pass  # Redis restarting (kombu's error is the send's)
        fair_redis.close()

    threads = [threading.Thread(target=submit_jobs), threading.Thread(target=cancel_some),
               threading.Thread(target=die_mid_dispatch)] + [
        threading.Thread(target=stream_one, args=(i,)) for i in range(N_STREAMS)]
    chaos_thread = threading.Thread(target=chaos)
    chaos_thread.start()
    for t in threads:
        t.start()
    chaos_thread.join()
    for t in threads:
        t.join(timeout=max(1, deadline - time.monotonic()))
    stack.wait_workers(N_WORKERS, timeout=60)

    all_ids = accepted + [s["id"] for s in streams if s.get("id")]

    def all_done():
        return all(stack.job(j).get("status") in ("completed", "failed", "cancelled") for j in all_ids)
    try:
        wait_until(all_done, max(10, deadline - time.monotonic()) + 60, "every job to finish", interval=1)
    except TimeoutError:
        stuck = [(j, stack.job(j)) for j in all_ids if stack.job(j).get("status") not in ("completed", "failed")]
        for job_id, record in stuck[:10]:
            print(job_id, {k: v for k, v in record.items() if k not in ("request", "result")},
                  "lease:", stack.job_redis(job_id).exists(f"{stack.prefix}:job:{job_id}:lease"),
                  "in leases:", stack.job_redis(job_id).zscore(f"{stack.prefix}:leases", job_id))
        print("stuck:", len(stuck), "queue length:", stack.redis.llen(stack.env["INTERACTIVE_QUEUE"]),
              "submitted:", len(accepted), "streams:", len(streams))
        raise

    lost = duplicated = cancelled = 0
    failures = collections.Counter()
    recoveries = []
    for job_id in all_ids:
        record = stack.job(job_id)
        events = [json.loads(f["e"]) for _, f in stack.job_redis(job_id).xrange(f"{stack.prefix}:job:{job_id}:log")]
        finals = [e for e in events if e["type"] != "delta"]
        text = "".join(e.get("text", "") for e in events if e["type"] == "delta")
        # A job whose cancel answered `cancelled` is over as cancelled; one asked while it ran ends either way.
        allowed = {"cancelled"} if cancels.get(job_id) == "cancelled" else \
            {"completed", "cancelled"} if job_id in cancels else {"completed"}
        if record.get("status") not in allowed or not finals:
            lost += 1
            failures[(record.get("status"), (record.get("error") or "")[:160])] += 1
            continue
        cancelled += record["status"] == "cancelled"
        expected_final = "done" if record["status"] == "completed" else "cancelled"
        if (len(finals) != 1 or finals[0]["type"] != expected_final
                or [e["seq"] for e in events] != list(range(len(events)))
                or (record["status"] == "completed" and text != json.loads(record["result"])["text"])):
            duplicated += 1
        if int(record.get("attempts", 1)) > 1 and "requeued_at" in record:
            # Recovery: from the kill to the job being back on its queue (the reaper's requeue).
            requeued = float(record["requeued_at"])
            last_kill = max((k for k in kills if k < requeued), default=None)
            if last_kill:
                recoveries.append(requeued - last_kill)

    def mismatched(seen: dict) -> bool:
        """Not read to its end, or not the job's final text; or (raw lines) event ids not contiguous from 0."""
        if not seen.get("done") or seen["text"] != json.loads(stack.job(seen["id"])["result"])["text"]:
            return True
        return seen["ids"] is not None and seen["ids"] != list(range(len(seen["ids"])))

    stream_mismatch = sum(map(mismatched, streams))
    recoveries.sort()
    p99 = recoveries[min(len(recoveries) - 1, int(0.99 * len(recoveries)))] if recoveries else 0.0
    terminal_report([
        "", f"chaos: jobs={len(all_ids)} (background {len(accepted)}, streamed {len(streams)}), "
            f"worker kills={len(kills)}, redis restarts={redis_restarts}, lost={lost}, duplicated={duplicated}, "
            f"stream mismatches={stream_mismatch}, resumed jobs={len(recoveries)}, p99 recovery={p99:.2f} s, "
            f"cancels asked={len(cancels)} (ended cancelled {cancelled}), cancel answers={dict(cancel_answers)}, "
            f"dispatchers dead mid-move={dict(dispatcher_deaths)}",
        *(f"chaos failure: {count} {failure}" for failure, count in failures.most_common(5)),
        *(f"chaos stream failure: {count} {error}" for error, count in stream_errors.most_common(5))])
    assert len(accepted) >= N_JOBS and len(streams) == N_STREAMS
    assert kills and redis_restarts == 1
    assert dispatcher_deaths["never sent"] and dispatcher_deaths["sent, not confirmed"], dispatcher_deaths
    assert lost == 0 and duplicated == 0 and stream_mismatch == 0
    assert cancels and all(isinstance(code, int) and code in (200, 503) for code in cancel_answers), cancel_answers
