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
