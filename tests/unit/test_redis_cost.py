"""scripts/bench/redis_cost.py: Redis's own CPU and commands over a stretch of work, per generated token and per
stream event (issue 17's measure), read from INFO cpu and INFO commandstats of a real Redis."""
from __future__ import annotations

import redis

from scripts.bench.redis_cost import RedisCost, per_work
from tests.conftest import REDIS_URL


def test_commands_between_two_readings_are_counted_per_name():
    client = redis.Redis.from_url(REDIS_URL)
    meter = RedisCost(client)
    before = meter.read()
    for i in range(50):
        client.set(f"redis-cost-test:{i}", i)
    client.delete(*[f"redis-cost-test:{i}" for i in range(50)])
    after = meter.read()
    used = after - before
    assert used.calls["set"] >= 50 and used.calls["del"] >= 1  # (the server may serve others meanwhile)
    assert used.usec["set"] > 0 and used.cpu_s >= 0
    assert used.total_calls >= 51  # (INFO itself counts too)
    assert used.requests >= 51  # one read per command sent on its own (no pipeline)


def test_per_work_divides_by_tokens_and_events():
    from scripts.bench.redis_cost import Usage

    used = Usage(cpu_s=0.02, calls={"evalsha": 100, "publish": 0, "get": 300}, usec={"evalsha": 4900, "get": 300},
                 requests=250)
    figures = per_work(used, tokens=1000, events=100)
    assert figures["redis_cpu_us_per_token"] == 20.0
    assert figures["redis_commands_per_token"] == 0.4
    assert figures["redis_requests_per_token"] == 0.25
    assert figures["redis_cpu_us_per_event"] == 200.0
    assert figures["redis_top_commands"][0] == {"command": "evalsha", "calls": 100, "usec_per_call": 49.0}
    assert per_work(used, tokens=0, events=0)["redis_cpu_us_per_token"] is None


def test_the_command_log_names_each_script_and_puts_back_the_slow_log_settings(make_store):
    """--redis-profile's log: a job's start and end come under their script and action, the commands the scripts
    ran apart from what clients sent, and the slow log is as it was afterwards."""
    from jobs.transition import Ending
    from scripts.bench.redis_cost import CommandLog, describe_log
    from tests.unit.conftest import new_job

    client = redis.Redis.from_url(REDIS_URL)
    before = client.config_get("slowlog-*")
    store = make_store(lease_s=5)
    log = CommandLog(client, max_entries=10_000)
    log.start()
    job_id = new_job(store)
    _, attempt = store.start(job_id, "w")
    store.write(attempt, [], Ending.cancelled())
    client.ping()
    groups = log.read()
    assert client.config_get("slowlog-*") == before
    # (>= 1: the server may serve others meanwhile)
    assert groups["evalsha transition start"][0] >= 1 and groups["evalsha transition write"][0] >= 1
    assert groups["evalsha metrics state"][0] >= 1 and groups["ping"][0] >= 1
    assert groups["(inside scripts)"][0] > 10 and "slowlog" not in groups
    lines = describe_log(groups, jobs=1)
    assert lines[0].startswith("redis profile:") and any("transition start" in line for line in lines)
