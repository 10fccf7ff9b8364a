"""Sharding (issue 17): the whole service with its job state over three Redis nodes (REDIS_SHARDS, jobs/shards.py),
each a private redis-server with the project's config (AOF), two workers and one API process.

A few dozen jobs run: streams read with the official SDK (sync and async, which read a broken stream again
from the start) and as raw lines (which resume after their last event id), and background jobs polled through
the API. Then it checks that the jobs spread over the three nodes (each holds some), that everything about a
job is on its own shard and nowhere else (its keys, and the shard's indexes name only its own jobs), and that
the API process relays every shard's events over one pub/sub connection per shard (CLIENT LIST on each: one
connection in pub/sub mode from the API process, not one per stream). And then, as tests/integration/test_chaos.py checks them: every job
ended exactly once (completed), its event log contiguous with one final event, every stream's text (and every
poll's result) equal to its job's final text, none lost.

`test_shard_restart` does the same while one shard that is not the home node (REDIS_URL's: the broker's) is
killed mid-run, its streams mid-way, and started again a few seconds later on the same port and data
directory: the job store retries meanwhile, workers keep their output (REDIS_RETRY_S), the relay resyncs
after its reconnect. The same checks: 0 lost, 0 duplicated, every stream equal to its job's final text.
SHARD_RESTART_MODE=term stops it with SIGTERM instead of SIGKILL."""
from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest

from scripts.stack import Stack, descendants, stack_env, start_redis_shards, stop_redis_servers, wait_until
from tests.integration.mixed_load import AUTH, KEY, TERMINAL, run_mixed_load, running_stack

N_SHARDS, N_BACKGROUND, N_STREAMS, N_WORKERS = 3, 24, 15, 2
STREAM_TOKENS = 1000  # long enough that streams are still mid-way when a shard goes (the tiny model is fast)
RESTART_MODE = os.environ.get("SHARD_RESTART_MODE", "kill")  # "kill": SIGKILL; "term": SIGTERM
DOWN_S = 3.0  # how long the restarted shard stays away


@pytest.fixture
def sharded_stack(tmp_path):
    servers = start_redis_shards(tmp_path / "redis", N_SHARDS)
    try:
        env = stack_env(shard_urls=[s.url for s in servers], api_keys=(KEY,), JOB_LEASE_S="2",
                        REAPER_INTERVAL_S="0.5", HEARTBEAT_INTERVAL_S="0.5", HEARTBEAT_TTL_S="3",
                        LOST_DELIVERY_S="5")
        with running_stack(env, tmp_path, N_WORKERS) as stack:
            yield stack, servers
    finally:
        stop_redis_servers(servers)


def api_client_ports(stack: Stack) -> set[tuple[int, int]]:
    """The API's processes' TCP sockets (gunicorn's master and its workers) as (local port, remote port): what
    Redis's CLIENT LIST shows as a client's `addr` port and its own `laddr` port. Both: a local port alone may be
    another process's too, on a connection to another Redis."""
    pids = [stack.processes["api"].pid, *descendants(stack.processes["api"].pid)]
    inodes: set[str] = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports: set[tuple[int, int]] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                ports.add((int(fields[1].rsplit(":", 1)[1], 16), int(fields[2].rsplit(":", 1)[1], 16)))
    return ports


def relay_connections(stack: Stack) -> list[dict]:
    """Per shard: the API process's pub/sub connections there (CLIENT LIST's flag P), each as (its pattern
    subscriptions, its channel subscriptions), and the shard's PUBSUB NUMPAT."""
    ports = api_client_ports(stack)
    out = []
    for node in stack.shards:
        mine = [c for c in node.client_list() if "P" in c["flags"] and
                (int(c["addr"].rsplit(":", 1)[1]), int(c["laddr"].rsplit(":", 1)[1])) in ports]
        out.append({"pubsub": [(int(c["psub"]), int(c["sub"])) for c in mine],
                    "numpat": node.execute_command("PUBSUB", "NUMPAT")})
    return out


def misplaced_keys(stack: Stack) -> tuple[list[int], int]:
    """Job records per shard, and how many job keys (record, log, lease, cancel flag) or entries of a shard's
    job indexes (leases, queued, the owner's job indexes) name a job of another shard."""
    prefix = stack.prefix
    records, wrong = [], 0
    for index, node in enumerate(stack.shards):
        count = 0
        for key in node.scan_iter(match=f"{prefix}:job:*", count=1000):
            job_id = key[len(f"{prefix}:job:"):].split(":")[0]
            wrong += stack.shard_of(job_id) != index
            count += key.count(":") == 2  # the record itself
        for index_key in (f"{prefix}:leases", f"{prefix}:queued", f"{prefix}:owner:{KEY}:jobs",
                          f"{prefix}:owner:{KEY}:unfinished"):
            wrong += sum(stack.shard_of(job_id) != index for job_id in node.zrange(index_key, 0, -1))
        records.append(count)
    return records, wrong


def open_relay_on_every_shard(stack: Stack, job_ids: list[str]) -> None:
    """Read one finished job's events on each shard (GET …/events), so that the API's hub of every shard is
    subscribed whatever shards the streams happened to land on (a hub connects on its shard's first stream)."""
    with httpx.Client(base_url=stack.base_url, timeout=30) as client:
        for index in range(len(stack.shards)):
            job_id = next(j for j in job_ids if stack.shard_of(j) == index)
            started = time.monotonic()
            with client.stream("GET", f"/v1/chat/completions/{job_id}/events", headers=AUTH) as response:
                assert response.status_code == 200, (job_id, response.status_code, response.read())
                lines = list(response.iter_lines())
            assert "data: [DONE]" in lines, (f"GET /events of finished job {job_id} (shard {index}) ended after "
                                             f"{time.monotonic() - started:.1f} s without [DONE]", lines[-5:])


def run_jobs(stack: Stack, deadline: float, disrupt=None) -> dict:
    """The mixed workload (mixed_load.run_mixed_load: background jobs polled, streams read by the SDK sync, the
    SDK async and as raw lines, `disrupt(streams, accepted)` beside them; every job checked), then where its
    jobs went: per shard, their records and misplaced keys, and the API's pub/sub connections. The figures."""
    figures = run_mixed_load(stack, deadline, n_background=N_BACKGROUND, n_streams=N_STREAMS,
                             stream_tokens=STREAM_TOKENS, disrupt=disrupt,
                             where=lambda job_id: f"shard {stack.shard_of(job_id) if job_id else '-'}")
    open_relay_on_every_shard(stack, figures["accepted"])
    records, wrong = misplaced_keys(stack)
    # Lost-delivery re-sends: a queued job's message taken for lost (sent again) by a worker's reaper.
    resent = sum(stack.log_dir.joinpath(f"{name}.log").read_text(errors="replace").count("its message was lost")
                 for name in stack.worker_pids())
    return dict(figures, resumed=len(figures["resumed"]),
                resumed_per_shard=[sum(stack.shard_of(j) == i for j in figures["resumed"]) for i in range(N_SHARDS)],
                per_shard=[sum(stack.shard_of(j) == i for j in figures["all_ids"]) for i in range(N_SHARDS)],
                records=records, misplaced=wrong, relay=relay_connections(stack), resent=resent)


def report_lines(name: str, figures: dict) -> list[str]:
    relay = figures["relay"]
    return [
        f"{name}: jobs={len(figures['all_ids'])} (background {len(figures['accepted'])}, streamed "
        f"{len(figures['streams'])}), jobs per shard={figures['per_shard']}, records per shard="
        f"{figures['records']}, keys or index entries on a wrong shard={figures['misplaced']}, API pub/sub "
        f"connections per shard (pattern, channel subscriptions)={[r['pubsub'] for r in relay]}, PUBSUB NUMPAT="
        f"{[r['numpat'] for r in relay]}, lost={figures['lost']}, "
        f"duplicated={figures['duplicated']}, stream mismatches={figures['stream_mismatch']}, poll mismatches="
        f"{figures['poll_mismatch']}, jobs resumed by a new attempt={figures['resumed']} (per shard {figures['resumed_per_shard']}), lost-delivery re-sends="
        f"{figures['resent']}, poll errors ridden out={figures['poll_errors']}",
        *(f"{name} failure: {count} {failure}" for failure, count in figures["failures"].most_common(5)),
        *(f"{name} stream mismatch: {m}" for m in figures["mismatches"][:10]),
        *(f"{name} stream failure: {count} {error}" for error, count in figures["stream_errors"].most_common(5))]


def check(figures: dict) -> None:
    assert len(figures["accepted"]) == N_BACKGROUND and len(figures["streams"]) == N_STREAMS
    assert all(figures["per_shard"]) and all(figures["records"]), "the jobs did not spread over every shard"
    assert figures["misplaced"] == 0
    # One pub/sub connection per shard from the API process, whatever it subscribes there (a pattern, or the
    # channels of the jobs it streams): never one per stream.
    assert [len(r["pubsub"]) for r in figures["relay"]] == [1] * N_SHARDS, figures["relay"]
    assert figures["lost"] == 0 and figures["duplicated"] == 0
    assert figures["stream_mismatch"] == 0 and figures["poll_mismatch"] == 0


@pytest.mark.timeout(150)
def test_jobs_over_three_shards(sharded_stack, terminal_report):
    stack, _ = sharded_stack
    figures = run_jobs(stack, deadline=time.monotonic() + 100)
    terminal_report(["", *report_lines("shards", figures)])
    check(figures)


@pytest.mark.timeout(150)
def test_shard_restart(sharded_stack, terminal_report):
    """A non-home shard killed while its streams are mid-way, started again DOWN_S later on its port and dir."""
    stack, servers = sharded_stack
    deadline = time.monotonic() + 100
    restart: dict = {}

    def restart_a_shard(streams: list[dict], accepted: list[str]):
        # Streams mid-way (some text read, not done) and background jobs queued and running.
        wait_until(lambda: len(accepted) >= N_BACKGROUND // 4 and
                   sum(bool(s.get("text")) and not s.get("done") for s in list(streams)) >= N_STREAMS // 3,
                   60, "streams to be mid-way", interval=0.05)
        # Of the shards other than the home node, the one with the more streams mid-way.
        def mid_way(index):
            return sum(1 for s in list(streams) if s.get("id") and not s.get("done")
                       and stack.shard_of(s["id"]) == index)
        victim = max(range(1, N_SHARDS), key=mid_way)
        restart.update(shard=victim, streams_mid_way=mid_way(victim),
                       unfinished=sum(stack.job(j).get("status") not in TERMINAL
                                      for j in [*accepted, *(s["id"] for s in list(streams) if s.get("id"))]
                                      if stack.shard_of(j) == victim))
        def progress():  # how far each unfinished stream on the other shards has read
            return {s["id"]: len(s["text"]) for s in list(streams)
                    if s.get("id") and not s.get("done") and stack.shard_of(s["id"]) != victim}
        restart["at"] = time.monotonic()
        servers[victim].stop(graceful=RESTART_MODE == "term")
        before = progress()
        time.sleep(DOWN_S)
        after = progress()
        # Streams of the shards that stayed up: did they go on while this one was away?
        restart["others_mid_way"] = len(before)
        restart["others_advanced"] = sum(after.get(job_id, 1 << 30) > n for job_id, n in before.items())
        servers[victim].start()
        restart["back_after_s"] = time.monotonic() - restart["at"]
        # The API's hub of that shard subscribes again (its old connection died with the server).
        wait_until(lambda: len(relay_connections(stack)[victim]["pubsub"]) == 1, 30, "the relay to reconnect")
        restart["relay_back_after_s"] = time.monotonic() - restart["at"]

    figures = run_jobs(stack, deadline, disrupt=restart_a_shard)
    terminal_report(["", f"shard restart ({RESTART_MODE}): shard {restart.get('shard')} (of {N_SHARDS}, not the "
                         f"home node) away with {restart.get('unfinished')} unfinished jobs on it, "
                         f"{restart.get('streams_mid_way')} of its streams mid-way; streams of the other shards that went on while it was away: {restart.get('others_advanced')} of {restart.get('others_mid_way')}; back after "
                         f"{restart.get('back_after_s', float('nan')):.1f} s, relay reconnected after "
                         f"{restart.get('relay_back_after_s', float('nan')):.1f} s",
                     *report_lines("shard restart", figures)])
    assert "relay_back_after_s" in restart, "the shard was not restarted (or the relay never resubscribed)"
    assert restart["unfinished"] > 0 and restart["streams_mid_way"] > 0
    check(figures)
